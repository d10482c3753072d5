#include "server/delta/head.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::RandomTensor;

class HeadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::TinyBert();
    ASSERT_NE(model_, nullptr);
    D_ = model_->info().embedding_dim;
    ASSERT_GT(D_, 0);
  }

  HeadSpec Classification(std::vector<std::string> labels, int64_t hidden = 0) {
    HeadSpec spec;
    spec.config = {{"type", "classification"}, {"labels", labels}};
    const int64_t n = static_cast<int64_t>(labels.size());
    const int64_t d_in = hidden > 0 ? hidden : D_;
    if (hidden > 0) {
      spec.tensors["dense.weight"] = RandomTensor({hidden, D_}, 0.3, 11);
      spec.tensors["dense.bias"] = RandomTensor({hidden}, 0.1, 12);
    }
    spec.tensors["out.weight"] = RandomTensor({n, d_in}, 0.3, 13);
    spec.tensors["out.bias"] = RandomTensor({n}, 0.1, 14);
    return spec;
  }

  HeadSpec Regression(int64_t hidden = 0) {
    HeadSpec spec;
    spec.config = {{"type", "regression"}};
    const int64_t d_in = hidden > 0 ? hidden : D_;
    if (hidden > 0) {
      spec.tensors["dense.weight"] = RandomTensor({hidden, D_}, 0.3, 21);
      spec.tensors["dense.bias"] = RandomTensor({hidden}, 0.1, 22);
    }
    spec.tensors["out.weight"] = RandomTensor({1, d_in}, 0.3, 23);
    spec.tensors["out.bias"] = RandomTensor({1}, 0.1, 24);
    return spec;
  }

  void ExpectInvalid(HeadSpec spec, const std::string& needle) {
    absl::StatusOr<std::unique_ptr<Head>> head = Head::Create(std::move(spec), *model_);
    ASSERT_FALSE(head.ok()) << needle;
    EXPECT_EQ(head.status().code(), absl::StatusCode::kInvalidArgument) << head.status();
    EXPECT_THAT(std::string(head.status().message()), HasSubstr("head: "));
    EXPECT_THAT(std::string(head.status().message()), HasSubstr(needle));
  }

  std::shared_ptr<const model::Model> model_;
  int64_t D_ = 0;
};

TEST_F(HeadTest, ClassificationWithoutDense) {
  HeadSpec spec = Classification({"negative", "positive", "neutral"});
  const at::Tensor w = spec.tensors["out.weight"], b = spec.tensors["out.bias"];
  auto head = Head::Create(spec, *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->type(), Head::Type::kClassification);
  EXPECT_THAT((*head)->labels(), ElementsAre("negative", "positive", "neutral"));
  EXPECT_EQ((*head)->bytes(), (3 * D_ + 3) * 4);
  // Canonical: no activation without a dense layer; labels in their order.
  EXPECT_EQ((*head)->spec().config,
            nlohmann::json({{"type", "classification"}, {"labels", {"negative", "positive", "neutral"}}}));
  EXPECT_EQ((*head)->spec().tensors.size(), 2u);

  at::Tensor x = RandomTensor({5, D_}, 1.0, 3);
  auto logits = (*head)->Apply(x);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(logits->scalar_type(), at::kFloat);
  EXPECT_TRUE(at::allclose(logits->cpu(), at::matmul(x, w.t()) + b, 1e-5, 1e-5));
}

TEST_F(HeadTest, ClassificationWithDenseAndEveryActivation) {
  for (const char* act : {"tanh", "relu", "gelu"}) {
    HeadSpec spec = Classification({"a", "b"}, 8);
    spec.config["activation"] = act;
    const at::Tensor dw = spec.tensors["dense.weight"], db = spec.tensors["dense.bias"];
    const at::Tensor w = spec.tensors["out.weight"], b = spec.tensors["out.bias"];
    auto head = Head::Create(spec, *model_);
    ASSERT_TRUE(head.ok()) << head.status();
    EXPECT_EQ((*head)->spec().config["activation"], act);
    EXPECT_EQ((*head)->bytes(), (8 * D_ + 8 + 2 * 8 + 2) * 4);
    at::Tensor x = RandomTensor({4, D_}, 1.0, 5);
    at::Tensor h = at::matmul(x, dw.t()) + db;
    h = std::string(act) == "tanh" ? at::tanh(h) : std::string(act) == "relu" ? at::relu(h) : at::gelu(h);
    auto logits = (*head)->Apply(x);
    ASSERT_TRUE(logits.ok()) << logits.status();
    EXPECT_TRUE(at::allclose(logits->cpu(), at::matmul(h, w.t()) + b, 1e-5, 1e-5)) << act;
  }
}

TEST_F(HeadTest, DefaultActivationIsTanhWhenDensePresent) {
  auto head = Head::Create(Classification({"a", "b"}, 4), *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->spec().config,
            nlohmann::json({{"type", "classification"}, {"labels", {"a", "b"}}, {"activation", "tanh"}}));
}

TEST_F(HeadTest, ActivationWithoutDenseIsValidatedThenDropped) {
  HeadSpec spec = Classification({"a", "b"});
  spec.config["activation"] = "relu";
  auto head = Head::Create(spec, *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_FALSE((*head)->spec().config.contains("activation"));
  spec.config["activation"] = "swish";
  ExpectInvalid(spec, "unknown activation \"swish\"");
  spec.config["activation"] = 3;
  ExpectInvalid(spec, "\"activation\" must be");
}

TEST_F(HeadTest, Regression) {
  HeadSpec spec = Regression(6);
  auto head = Head::Create(spec, *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->type(), Head::Type::kRegression);
  EXPECT_TRUE((*head)->labels().empty());
  EXPECT_EQ((*head)->spec().config, nlohmann::json({{"type", "regression"}, {"activation", "tanh"}}));
  auto values = (*head)->Apply(RandomTensor({3, D_}, 1.0, 9));
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ(values->sizes(), (std::vector<int64_t>{3, 1}));
  // Zero rows are fine.
  auto none = (*head)->Apply(RandomTensor({0, D_}, 1.0, 9));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->sizes(), (std::vector<int64_t>{0, 1}));
}

TEST_F(HeadTest, RejectsBadType) {
  HeadSpec spec = Classification({"a"});
  spec.config.erase("type");
  ExpectInvalid(spec, "\"type\" is required");
  spec.config["type"] = "ranking";
  ExpectInvalid(spec, "unknown type \"ranking\"");
  spec.config["type"] = 1;
  ExpectInvalid(spec, "\"type\" must be");
  HeadSpec not_object = Classification({"a"});
  not_object.config = nlohmann::json::array();
  ExpectInvalid(not_object, "config must be a JSON object");
  HeadSpec extra = Classification({"a"});
  extra.config["num_labels"] = 1;
  ExpectInvalid(extra, "unknown config key \"num_labels\"");
}

TEST_F(HeadTest, RejectsBadLabels) {
  HeadSpec spec = Classification({"a", "b"});
  spec.config.erase("labels");
  ExpectInvalid(spec, "needs \"labels\"");
  spec.config["labels"] = nlohmann::json::array();
  ExpectInvalid(spec, "non-empty list of strings");
  spec.config["labels"] = "a,b";
  ExpectInvalid(spec, "non-empty list of strings");
  spec.config["labels"] = {"a", 2};
  ExpectInvalid(spec, "must hold strings, got 2");
  spec.config["labels"] = {"a", "a"};
  ExpectInvalid(spec, "label \"a\" appears twice");
  spec.config["labels"] = {"a", ""};
  ExpectInvalid(spec, "empty label");
  HeadSpec regression = Regression();
  regression.config["labels"] = {"x"};
  ExpectInvalid(regression, "regression head has no \"labels\"");
}

TEST_F(HeadTest, RejectsBadTensors) {
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors.erase("out.bias");
    ExpectInvalid(spec, "tensor \"out.bias\" is missing");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors.erase("out.weight");
    ExpectInvalid(spec, "tensor \"out.weight\" is missing");
  }
  {
    HeadSpec spec = Classification({"a", "b", "c"});  // out.weight has 3 rows
    spec.config["labels"] = {"a", "b"};
    ExpectInvalid(spec, "tensor \"out.weight\" has shape [3,");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors["out.weight"] = RandomTensor({2, D_ + 1}, 0.1, 1);
    ExpectInvalid(spec, "expected [2," + std::to_string(D_) + "]");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors["out.weight"] = spec.tensors["out.weight"].to(at::kDouble);
    ExpectInvalid(spec, "expected float32");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors["out.weight"] = spec.tensors["out.weight"].clone();
    spec.tensors["out.weight"][1][0] = std::numeric_limits<float>::quiet_NaN();
    ExpectInvalid(spec, "holds NaN or Inf");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors["out.bias"] = spec.tensors["out.bias"].clone();
    spec.tensors["out.bias"][0] = std::numeric_limits<float>::infinity();
    ExpectInvalid(spec, "holds NaN or Inf");
  }
  {
    HeadSpec spec = Classification({"a", "b"});
    spec.tensors["classifier.weight"] = RandomTensor({2, D_}, 0.1, 1);
    ExpectInvalid(spec, "unexpected tensor \"classifier.weight\"");
  }
  {
    HeadSpec spec = Classification({"a", "b"}, 8);
    spec.tensors.erase("dense.weight");
    ExpectInvalid(spec, "tensor \"dense.weight\" is missing");
  }
  {
    HeadSpec spec = Classification({"a", "b"}, 8);
    spec.tensors.erase("dense.bias");
    ExpectInvalid(spec, "tensor \"dense.bias\" is missing");
  }
  {
    HeadSpec spec = Classification({"a", "b"}, 8);
    spec.tensors["dense.weight"] = RandomTensor({8, D_ - 1}, 0.1, 1);
    ExpectInvalid(spec, "tensor \"dense.weight\" has shape");
  }
  {
    HeadSpec spec = Classification({"a", "b"}, 8);
    spec.tensors["dense.weight"] = RandomTensor({8}, 0.1, 1);
    ExpectInvalid(spec, "tensor \"dense.weight\" has shape [8]");
  }
  {
    HeadSpec spec = Classification({"a", "b"}, 8);  // out.weight is [2, 8], wrong without dense
    spec.tensors.erase("dense.weight");
    spec.tensors.erase("dense.bias");
    ExpectInvalid(spec, "tensor \"out.weight\" has shape [2,8]");
  }
  {
    HeadSpec spec = Regression();
    spec.tensors["out.weight"] = RandomTensor({2, D_}, 0.1, 1);
    ExpectInvalid(spec, "tensor \"out.weight\" has shape [2,");
  }
}

TEST_F(HeadTest, ApplyRejectsBadInput) {
  auto head = Head::Create(Classification({"a", "b"}), *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->Apply(at::Tensor()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*head)->Apply(RandomTensor({2, D_ + 1}, 1, 1)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*head)->Apply(RandomTensor({D_}, 1, 1)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*head)->Apply(RandomTensor({2, D_}, 1, 1).to(at::kDouble)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(HeadTest, CanonicalSpecIsStable) {
  // Creating a head from its own canonical spec gives the same canonical spec.
  auto head = Head::Create(Classification({"z", "y", "x"}, 4), *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  auto again = Head::Create((*head)->spec(), *model_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->spec().config, (*head)->spec().config);
  ASSERT_EQ((*again)->spec().tensors.size(), (*head)->spec().tensors.size());
  for (const auto& [name, t] : (*head)->spec().tensors) {
    EXPECT_TRUE(t.equal((*again)->spec().tensors.at(name))) << name;
    EXPECT_TRUE(t.is_contiguous());
    EXPECT_EQ(t.device().type(), c10::DeviceType::CPU);
  }
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
