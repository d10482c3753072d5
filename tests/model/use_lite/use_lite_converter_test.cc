#include "server/model/use_lite/use_lite_converter.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/model/safetensors.h"
#include "server/model/use_lite/use_lite_model.h"
#include "tests/model/use_lite/test_paths.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::HasSubstr;

class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/use_lite_converter_test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~ScratchDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  void Write(const std::string& file, const std::string& contents) const {
    std::ofstream out(path_ + "/" + file, std::ios::binary | std::ios::trunc);
    out << contents;
  }

 private:
  std::string path_;
};

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// A two-weight TF.js manifest over two shards: w1 [2,3] float32 (24 bytes), w2 [2] int32 (8 bytes).
void WriteTinyTfjs(const ScratchDir& dir) {
  dir.Write("model.json", R"({"modelTopology": {"node": []}, "weightsManifest": [{
      "paths": ["group1-shard1of2", "group1-shard2of2"],
      "weights": [{"name": "w1", "shape": [2, 3], "dtype": "float32"},
                  {"name": "w2", "shape": [2], "dtype": "int32"}]}]})");
  const std::string stream = Floats({1, 2, 3, 4, 5, 6}) + std::string("\x07\0\0\0\x08\0\0\0", 8);
  dir.Write("group1-shard1of2", stream.substr(0, 16));
  dir.Write("group1-shard2of2", stream.substr(16));
}

TEST(TfjsWeightsTest, ReadsTheConcatenatedShardStream) {
  ScratchDir dir;
  WriteTinyTfjs(dir);
  auto weights = ReadTfjsWeights(dir.path());
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_EQ(weights->size(), 2u);
  const at::Tensor w1 = weights->at("w1");
  EXPECT_EQ(w1.sizes(), at::IntArrayRef({2, 3}));
  EXPECT_EQ(w1.scalar_type(), at::kFloat);
  EXPECT_EQ(w1[1][2].item<float>(), 6.0f);
  const at::Tensor w2 = weights->at("w2");
  EXPECT_EQ(w2.scalar_type(), at::kInt);
  EXPECT_EQ(w2[1].item<int32_t>(), 8);
}

TEST(TfjsWeightsTest, TruncatedShardIsRejected) {
  ScratchDir dir;
  WriteTinyTfjs(dir);
  dir.Write("group1-shard2of2", Floats({5, 6}));  // 8 of 16 bytes
  auto weights = ReadTfjsWeights(dir.path());
  EXPECT_EQ(weights.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(weights.status().message()), HasSubstr("w2"));
  EXPECT_THAT(std::string(weights.status().message()), HasSubstr("truncated"));
}

TEST(TfjsWeightsTest, ExtraShardBytesAreRejected) {
  ScratchDir dir;
  WriteTinyTfjs(dir);
  std::ofstream(dir.path() + "/group1-shard2of2", std::ios::binary | std::ios::app) << "xxxx";
  EXPECT_EQ(ReadTfjsWeights(dir.path()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TfjsWeightsTest, MissingShardOrManifestIsNotFound) {
  ScratchDir dir;
  EXPECT_EQ(ReadTfjsWeights(dir.path()).status().code(), absl::StatusCode::kNotFound);
  WriteTinyTfjs(dir);
  std::filesystem::remove(dir.path() + "/group1-shard2of2");
  auto weights = ReadTfjsWeights(dir.path());
  EXPECT_EQ(weights.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(weights.status().message()), HasSubstr("group1-shard2of2"));
}

TEST(TfjsWeightsTest, BadManifestsAreInvalidArgument) {
  const std::vector<std::string> manifests = {
      "not json",
      R"({"weightsManifest": []})",
      R"({"weightsManifest": [{"paths": ["s"]}]})",
      R"({"weightsManifest": [{"paths": ["s"], "weights": [{"name": "w", "shape": [-1], "dtype": "float32"}]}]})",
      R"({"weightsManifest": [{"paths": ["s"], "weights": [{"name": "w", "shape": [1], "dtype": "float16"}]}]})",
      R"({"weightsManifest": [{"paths": ["s"], "weights": [{"name": "w", "shape": [1], "dtype": "float32",
          "quantization": {"dtype": "uint8"}}]}]})",
      R"({"weightsManifest": [{"paths": ["../s"], "weights": []}]})",
      R"({"weightsManifest": [{"paths": ["s"], "weights": [{"name": "w", "shape": [1], "dtype": "float32"},
          {"name": "w", "shape": [1], "dtype": "float32"}]}]})",
  };
  for (const std::string& manifest : manifests) {
    ScratchDir dir;
    dir.Write("model.json", manifest);
    dir.Write("s", Floats({1, 2}));
    EXPECT_EQ(ReadTfjsWeights(dir.path()).status().code(), absl::StatusCode::kInvalidArgument) << manifest;
  }
}

// The real package (from the project's shared data).
class UseLiteConverterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tfjs_dir_ = testing::SharedTfjsDir();
    if (tfjs_dir_.empty()) {
      GTEST_SKIP() << "upstream TF.js files not found in models/use-lite/tfjs (run scripts/get_use_lite.sh) nor in "
                   << testing::SourceDir() << "/../shared/data/use-lite-energetic";
    }
  }
  std::string tfjs_dir_;
};

TEST_F(UseLiteConverterTest, ConvertsTheRealPackage) {
  ScratchDir out;
  ASSERT_TRUE(ConvertUseLiteDirectory(tfjs_dir_, out.path(), UseLiteConvertOptions()).ok());
  const nlohmann::json config = nlohmann::json::parse(testing::ReadFileOrDie(out.path() + "/config.json"));
  EXPECT_EQ(config["model_type"], "use-lite");
  EXPECT_EQ(config["vocab_size"], 8002);
  EXPECT_EQ(config["embedding_size"], 256);
  EXPECT_EQ(config["hidden_size"], 512);
  EXPECT_EQ(config["num_hidden_layers"], 2);
  EXPECT_EQ(config["max_position_embeddings"], 128);
  EXPECT_EQ(config["layers"][0]["attention_scale"], 0.125);
  EXPECT_EQ(config["layers"][0]["residual_projection"], true);
  EXPECT_EQ(config["layers"][1]["residual_projection"], false);
  EXPECT_EQ(config["layers"][1]["attention_head_size"], 128);

  auto file = SafetensorsFile::Open(out.path() + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  // embeddings + timing (2), 16 per layer, the layer-0 residual projection (2), the pooler (2).
  EXPECT_EQ((*file)->names().size(), 2u + 16u * 2 + 2 + 2);
  auto query = (*file)->Load("encoder.layer.0.attention.self.query.weight", at::kFloat);
  ASSERT_TRUE(query.ok());
  EXPECT_EQ(query->sizes(), at::IntArrayRef({256, 256}));
  // Linear weights are the TF kernels transposed: query.weight[o][i] == qkv_kernel[0][0][i][o].
  auto tfjs = ReadTfjsWeights(tfjs_dir_);
  ASSERT_TRUE(tfjs.ok());
  const at::Tensor kernel = tfjs->at(
      "module/Encoder_en/KonaTransformer/Encode/Layer_0/TransformerLayer/MultiheadAttention/qkv_transform_single/"
      "kernel/part_0");
  EXPECT_EQ((*query)[3][5].item<float>(), kernel[0][0][5][3].item<float>());
  auto value = (*file)->Load("encoder.layer.0.attention.self.value.weight", at::kFloat);
  EXPECT_EQ((*value)[3][5].item<float>(), kernel[0][0][5][512 + 3].item<float>());

  // The converted directory loads as a model.
  auto model = LoadUseLiteModel(out.path(), ModelOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->info().name, "use-lite-energetic-0.2.0");
}

TEST_F(UseLiteConverterTest, TruncatedRealShardIsRejected) {
  ScratchDir copy;
  for (const auto& entry : std::filesystem::directory_iterator(tfjs_dir_)) {
    std::filesystem::copy_file(entry.path(), copy.path() + "/" + entry.path().filename().string());
    std::filesystem::permissions(copy.path() + "/" + entry.path().filename().string(),
                                 std::filesystem::perms::owner_write, std::filesystem::perm_options::add);
  }
  std::filesystem::resize_file(copy.path() + "/group1-shard7of7", 1000000);
  ScratchDir out;
  absl::Status status = ConvertUseLiteDirectory(copy.path(), out.path(), UseLiteConvertOptions());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("truncated"));
  EXPECT_FALSE(std::filesystem::exists(out.path() + "/config.json"));
}

TEST_F(UseLiteConverterTest, UnexpectedGraphIsRejected) {
  auto tfjs = ReadTfjsWeights(tfjs_dir_);
  ASSERT_TRUE(tfjs.ok());
  nlohmann::json model = nlohmann::json::parse(testing::ReadFileOrDie(tfjs_dir_ + "/model.json"));
  // Make Layer_0 read the timing-signal sum only once: the converter must not silently produce a different model.
  for (auto& node : model["modelTopology"]["node"]) {
    if (node["name"] == "module_apply_default/Encoder_en/KonaTransformer/Encode/TransformerStack/Layer_0/add") {
      node["input"][0] = "module_apply_default/Encoder_en/KonaTransformer/Encode/TransformerStack/Layer_0/"
                         "AddTimingSignal/Scatter/ScatterNd";
    }
  }
  auto converted = ConvertUseLiteWeights(model.dump(), *tfjs, UseLiteConvertOptions());
  EXPECT_EQ(converted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(converted.status().message()), HasSubstr("Layer_0/add"));
  // A weight of the wrong shape.
  std::map<std::string, at::Tensor> damaged = *tfjs;
  damaged["module/Embeddings_en"] = damaged["module/Embeddings_en"].narrow(1, 0, 128);
  auto bad_shape = ConvertUseLiteWeights(testing::ReadFileOrDie(tfjs_dir_ + "/model.json"), damaged,
                                         UseLiteConvertOptions());
  EXPECT_EQ(bad_shape.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
