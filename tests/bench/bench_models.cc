#include "tests/bench/bench_models.h"

#include <sys/stat.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace bench {

std::vector<std::string> ReadSentences(const std::string& path, size_t max) {
  std::vector<std::string> out;
  std::ifstream in(path);
  std::string line;
  bool first = true;
  while (out.size() < max && std::getline(in, line)) {
    std::string text = line.substr(0, line.find('\t'));
    const bool header = first && (text == "sentence" || text == "text");
    first = false;
    if (!header && !text.empty()) out.push_back(std::move(text));
  }
  return out;
}

std::string WriteBertBase(const std::string& dir) {
  struct stat st;
  if (::stat((dir + "/model.safetensors").c_str(), &st) == 0) return dir;
  ::mkdir(dir.c_str(), 0755);
  const int64_t H = 768, L = 12, F = 3072, V = 30522, P = 512;
  {
    std::ofstream vocab(dir + "/vocab.txt");
    vocab << "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n";
    for (int64_t i = 5; i < V; ++i) vocab << "w" << i << "\n";
  }
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "bert", "vocab_size": )", V, R"(, "hidden_size": )", H, R"(, "num_hidden_layers": )", L,
      R"(, "num_attention_heads": 12, "intermediate_size": )", F, R"(, "max_position_embeddings": )", P, "}");
  at::manual_seed(0);
  std::map<std::string, at::Tensor> t;
  auto rnd = [](std::vector<int64_t> shape) { return at::randn(shape) * 0.02; };
  t["embeddings.word_embeddings.weight"] = rnd({V, H});
  t["embeddings.position_embeddings.weight"] = rnd({P, H});
  t["embeddings.token_type_embeddings.weight"] = rnd({2, H});
  t["embeddings.LayerNorm.weight"] = at::ones({H});
  t["embeddings.LayerNorm.bias"] = at::zeros({H});
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      t[p + n + ".weight"] = rnd({H, H});
      t[p + n + ".bias"] = at::zeros({H});
    }
    t[p + "intermediate.dense.weight"] = rnd({F, H});
    t[p + "intermediate.dense.bias"] = at::zeros({F});
    t[p + "output.dense.weight"] = rnd({H, F});
    t[p + "output.dense.bias"] = at::zeros({H});
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = at::ones({H});
      t[p + n + ".bias"] = at::zeros({H});
    }
  }
  const absl::Status written = model::WriteSafetensors(dir + "/model.safetensors", t);
  if (!written.ok()) {
    std::fprintf(stderr, "writing bert-base: %s\n", written.ToString().c_str());
    std::exit(1);
  }
  return dir;
}

}  // namespace bench
}  // namespace deltaserve
