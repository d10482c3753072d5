// deltaserve-pack, run as a process: import-peft -> a canonical pack the server accepts with the same digest,
// inspect, export-peft, and its error / usage exits.
#include <ATen/ATen.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::MakeTempDir;
using testing::RandomTensor;

std::string Tool() {
  const char* env = std::getenv("DS_BINARY_DIR");
  return absl::StrCat(env != nullptr && *env ? env : DS_BINARY_DIR, "/tools/deltaserve-pack");
}

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

struct Result {
  int code = -1;
  std::string out, err;
};

Result RunTool(const std::vector<std::string>& args) {
  static const std::string dir = MakeTempDir("pack_tool_test");
  std::string cmd = Quote(Tool());
  for (const std::string& a : args) cmd += " " + Quote(a);
  cmd += absl::StrCat(" >", dir, "/out 2>", dir, "/err");
  Result r;
  const int rc = std::system(cmd.c_str());
  r.code = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  r.out = ReadFileToString(dir + "/out").value_or("");
  r.err = ReadFileToString(dir + "/err").value_or("");
  return r;
}

// A tiny BertForSequenceClassification-style checkpoint ("bert." prefix, with the pooler) in its own directory.
std::string WriteModelDir() {
  const std::string dir = MakeTempDir("pack_tool_test");
  const int64_t H = 32, F = 64, P = 32;
  std::vector<std::string> words = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "good", "bad"};
  std::ofstream vocab(dir + "/vocab.txt");
  for (const auto& w : words) vocab << w << "\n";
  vocab.close();
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "bert", "vocab_size": )", words.size(), R"(, "hidden_size": )", H,
      R"(, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": )", F,
      R"(, "max_position_embeddings": )", P, R"(, "type_vocab_size": 2, "layer_norm_eps": 1e-12})");
  std::map<std::string, at::Tensor> t;
  uint64_t seed = 5000;
  auto rnd = [&](std::vector<int64_t> shape, double scale) { return RandomTensor(shape, scale, seed++); };
  const int64_t V = static_cast<int64_t>(words.size());
  t["bert.embeddings.word_embeddings.weight"] = rnd({V, H}, 0.5);
  t["bert.embeddings.position_embeddings.weight"] = rnd({P, H}, 0.1);
  t["bert.embeddings.token_type_embeddings.weight"] = rnd({2, H}, 0.1);
  t["bert.embeddings.LayerNorm.weight"] = at::ones({H});
  t["bert.embeddings.LayerNorm.bias"] = rnd({H}, 0.1);
  for (int l = 0; l < 2; ++l) {
    const std::string p = absl::StrCat("bert.encoder.layer.", l, ".");
    for (const char* n :
         {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}) {
      t[p + n + ".weight"] = rnd({H, H}, 0.2);
      t[p + n + ".bias"] = rnd({H}, 0.05);
    }
    t[p + "intermediate.dense.weight"] = rnd({F, H}, 0.2);
    t[p + "intermediate.dense.bias"] = rnd({F}, 0.05);
    t[p + "output.dense.weight"] = rnd({H, F}, 0.2);
    t[p + "output.dense.bias"] = rnd({H}, 0.05);
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = at::ones({H});
      t[p + n + ".bias"] = rnd({H}, 0.1);
    }
  }
  t["bert.pooler.dense.weight"] = rnd({H, H}, 0.2);
  t["bert.pooler.dense.bias"] = rnd({H}, 0.1);
  EXPECT_TRUE(model::WriteSafetensors(dir + "/model.safetensors", t).ok());
  return dir;
}

// A PEFT LoRA adapter for sequence classification (query / value + the classifier in modules_to_save).
std::string WritePeftDir() {
  const std::string dir = MakeTempDir("pack_tool_test");
  nlohmann::json config = {{"peft_type", "LORA"},
                           {"task_type", "SEQ_CLS"},
                           {"r", 4},
                           {"lora_alpha", 8},
                           {"target_modules", {"query", "value"}},
                           {"bias", "none"},
                           {"modules_to_save", {"classifier", "score"}},
                           {"base_model_name_or_path", "tiny"}};
  std::ofstream(dir + "/adapter_config.json") << config.dump();
  std::map<std::string, at::Tensor> t;
  uint64_t seed = 6000;
  for (int l = 0; l < 2; ++l) {
    for (const char* n : {"query", "value"}) {
      const std::string key = absl::StrCat("base_model.model.bert.encoder.layer.", l, ".attention.self.", n);
      t[key + ".lora_A.weight"] = RandomTensor({4, 32}, 0.2, seed++);
      t[key + ".lora_B.weight"] = RandomTensor({32, 4}, 0.2, seed++);
    }
  }
  t["base_model.model.classifier.weight"] = RandomTensor({2, 32}, 0.2, seed++);
  t["base_model.model.classifier.bias"] = RandomTensor({2}, 0.1, seed++);
  EXPECT_TRUE(model::WriteSafetensors(dir + "/adapter_model.safetensors", t, {{"format", "pt"}}).ok());
  return dir;
}

TEST(PackToolTest, ImportInspectAndExportPeft) {
  const std::string model_dir = WriteModelDir();
  const std::string peft_dir = WritePeftDir();
  const std::string out = MakeTempDir("pack_tool_test") + "/task.dpack";

  Result r =
      RunTool({"import-peft", "--model_dir=" + model_dir, "--name=sst2", "--labels=negative,positive", peft_dir, out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr("wrote " + out), HasSubstr("lora, head")));

  // The written pack is canonical: the server's digest is sha256 of these bytes.
  auto bytes = ReadFileToString(out);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto model = model::LoadModel(model_dir, {});
  ASSERT_TRUE(model.ok()) << model.status();
  auto pack = DeltaPack::Load(*bytes, **model, {});
  ASSERT_TRUE(pack.ok()) << pack.status();
  EXPECT_EQ((*pack)->digest(), Sha256Digest(*bytes));
  EXPECT_THAT(r.out, HasSubstr("digest: " + (*pack)->digest()));
  EXPECT_EQ((*pack)->manifest().name, "sst2");
  ASSERT_NE((*pack)->head(), nullptr);
  EXPECT_EQ((*pack)->head()->labels(), (std::vector<std::string>{"negative", "positive"}));
  // The head is exact: the pooler came from the model directory's checkpoint.
  EXPECT_EQ((*pack)->manifest().provenance["head_pooler_from"], "base_checkpoint");

  r = RunTool({"inspect", out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr("digest: " + (*pack)->digest()), HasSubstr("\"name\": \"sst2\""),
                           HasSubstr("lora/encoder.layer.1.attention.self.value.lora_B [32,4]"),
                           HasSubstr("head/dense.weight [32,32]"), HasSubstr("\"imported_from\": \"peft\"")));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("not in canonical form")));

  // Export: the head has no PEFT LoRA form unless left out.
  const std::string exported = MakeTempDir("pack_tool_test") + "/peft";
  r = RunTool({"export-peft", "--model_dir=" + model_dir, out, exported});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("deltaserve-pack: UNIMPLEMENTED: "));
  r = RunTool({"export-peft", "--model_dir=" + model_dir, "--skip_head", "--module_prefix=bert.", out, exported});
  ASSERT_EQ(r.code, 0) << r.err;
  auto config = ReadJsonObject(exported + "/adapter_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ((*config)["base_model_name_or_path"], model_dir);
  auto weights = model::SafetensorsFile::Open(exported + "/adapter_model.safetensors");
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_TRUE((*weights)->contains("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"));
}

TEST(PackToolTest, ErrorsAndUsage) {
  Result r = RunTool({});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("no command"));
  r = RunTool({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown command \"frobnicate\""));
  r = RunTool({"import-peft", "a", "b"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--model_dir"));
  r = RunTool({"inspect"});
  EXPECT_EQ(r.code, 2);

  const std::string junk = MakeTempDir("pack_tool_test") + "/junk.dpack";
  std::ofstream(junk) << "definitely not a pack";
  r = RunTool({"inspect", junk});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, AllOf(HasSubstr("deltaserve-pack: INVALID_ARGUMENT: "), HasSubstr(junk)));
  r = RunTool({"inspect", junk + ".missing"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("deltaserve-pack: NOT_FOUND: "));

  const std::string model_dir = WriteModelDir();
  r = RunTool({"import-peft", "--model_dir=" + model_dir, MakeTempDir("pack_tool_test"),
               MakeTempDir("pack_tool_test") + "/x.dpack"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, AllOf(HasSubstr("deltaserve-pack: NOT_FOUND: "), HasSubstr("adapter_config.json")));
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
