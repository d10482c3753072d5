#include "tests/server/test_packs.h"

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "server/delta/delta_pack.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace testing {

std::string LoraHeadPack(const model::Model& model, const std::string& name, uint64_t seed,
                         const std::string& fingerprint) {
  delta::PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = model.info().family;
  c.manifest.backbone_fingerprint = fingerprint.empty() ? model.info().fingerprint : fingerprint;
  delta::MethodSpec lora;
  lora.kind = delta::MethodKind::kLora;
  lora.config = {{"rank", 2}, {"alpha", 4}, {"targets", {"query", "value"}}};
  for (const auto& info : model.modules()) {
    if (info.kind != model::ModuleKind::kLinear) continue;
    if (!(absl::EndsWith(info.name, ".query") || absl::EndsWith(info.name, ".value"))) continue;
    lora.tensors[info.name + ".lora_A"] = delta::testing::RandomTensor({2, info.in_features}, 0.3, seed++);
    lora.tensors[info.name + ".lora_B"] = delta::testing::RandomTensor({info.out_features, 2}, 0.3, seed++);
  }
  c.methods.push_back(lora);
  delta::HeadSpec head;
  head.config = {{"type", "classification"}, {"labels", {"neg", "pos"}}};
  head.tensors["out.weight"] = delta::testing::RandomTensor({2, model.info().embedding_dim}, 1.0, seed++);
  head.tensors["out.bias"] = delta::testing::RandomTensor({2}, 0.1, seed++);
  c.head = head;
  auto bytes = delta::SerializePack(c);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *bytes : std::string();
}

}  // namespace testing
}  // namespace deltaserve
