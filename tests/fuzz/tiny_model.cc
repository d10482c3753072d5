#include "tests/fuzz/tiny_model.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/model/model_loader.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace fuzz {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "fuzz harness: %s\n", message.c_str());
  std::abort();
}

// The safetensors bytes of float32 tensors, written by hand (no LibTorch ops here: the harness stays cheap to
// compile). Values are a fixed LCG sequence: offset + scale * [-1, 1).
class TensorWriter {
 public:
  void Add(const std::string& name, std::vector<int64_t> shape, float scale, float offset = 0.f) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const uint64_t begin = data_.size();
    for (int64_t i = 0; i < n; ++i) {
      state_ = state_ * 6364136223846793005ull + 1442695040888963407ull;
      const float unit = static_cast<float>(state_ >> 40) / static_cast<float>(1ull << 24);  // [0, 1)
      const float value = offset + scale * (2.f * unit - 1.f);
      char bytes[4];
      std::memcpy(bytes, &value, 4);  // little-endian hosts only, like the server
      data_.append(bytes, 4);
    }
    header_[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data_.size()}}};
  }

  std::string Bytes() const {
    std::string header = header_.dump();
    while (header.size() % 8 != 0) header += ' ';
    std::string out(8, '\0');
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return out + header + data_;
  }

 private:
  nlohmann::json header_ = nlohmann::json::object();
  std::string data_;
  uint64_t state_ = 0x9e3779b97f4a7c15ull;
};

void WriteTinyBert(const std::string& dir) {
  const int64_t H = 8, L = 2, F = 16, P = 16;
  const std::vector<std::string> words = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the",  "a",    "cat",
                                          "dog",   "sat",   "on",    "mat",   "hello",  "world", "!",    ",",
                                          ".",     "is",    "was",   "big",   "small",  "red",  "blue", "house",
                                          "tree",  "run",   "##s",   "##ing", "and",    "good", "bad",  "movie",
                                          "film",  "great", "awful", "love",  "hate",   "this", "it",   "very"};
  const int64_t V = static_cast<int64_t>(words.size());
  std::string vocab;
  for (const std::string& w : words) vocab += w + "\n";
  WriteScratchFile(dir + "/vocab.txt", vocab);
  WriteScratchFile(dir + "/config.json",
                   absl::StrCat(R"({"model_type": "bert", "vocab_size": )", V, R"(, "hidden_size": )", H,
                                R"(, "num_hidden_layers": )", L, R"(, "num_attention_heads": 2, "intermediate_size": )",
                                F, R"(, "max_position_embeddings": )", P,
                                R"(, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"})"));
  TensorWriter t;
  t.Add("embeddings.word_embeddings.weight", {V, H}, 0.5f);
  t.Add("embeddings.position_embeddings.weight", {P, H}, 0.1f);
  t.Add("embeddings.token_type_embeddings.weight", {2, H}, 0.1f);
  t.Add("embeddings.LayerNorm.weight", {H}, 0.1f, 1.f);
  t.Add("embeddings.LayerNorm.bias", {H}, 0.1f);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      t.Add(absl::StrCat(p, n, ".weight"), {H, H}, 0.3f);
      t.Add(absl::StrCat(p, n, ".bias"), {H}, 0.05f);
    }
    t.Add(p + "intermediate.dense.weight", {F, H}, 0.3f);
    t.Add(p + "intermediate.dense.bias", {F}, 0.05f);
    t.Add(p + "output.dense.weight", {H, F}, 0.3f);
    t.Add(p + "output.dense.bias", {H}, 0.05f);
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t.Add(absl::StrCat(p, n, ".weight"), {H}, 0.1f, 1.f);
      t.Add(absl::StrCat(p, n, ".bias"), {H}, 0.1f);
    }
  }
  WriteScratchFile(dir + "/model.safetensors", t.Bytes());
}

}  // namespace

const std::string& TinyBertDir() {
  static const std::string* dir = [] {
    auto* d = new std::string(ScratchDir() + "/tiny_bert");
    std::error_code ec;
    std::filesystem::create_directories(*d, ec);
    if (ec) Die(absl::StrCat("cannot create ", *d, ": ", ec.message()));
    WriteTinyBert(*d);
    return d;
  }();
  return *dir;
}

const model::Model& TinyBert() {
  static const model::Model* model = [] {
    absl::StatusOr<std::unique_ptr<model::Model>> m = model::LoadModel(TinyBertDir(), model::ModelOptions());
    if (!m.ok()) Die(absl::StrCat("cannot load the tiny BERT: ", m.status().ToString()));
    return m->release();  // kept for the life of the process (reachable from this static: not a leak)
  }();
  return *model;
}

}  // namespace fuzz
}  // namespace deltaserve
