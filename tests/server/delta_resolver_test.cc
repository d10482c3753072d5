// DirectoryDeltaResolver over a real directory of packs bound to a tiny BERT.
#include "server/inference/delta_resolver.h"

#include <sys/stat.h>

#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/delta/delta_test_util.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace inference {
namespace {

using ::testing::HasSubstr;

delta::PackContents BitFitPack(const model::Model& m, const std::string& name, uint64_t seed) {
  delta::PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = m.info().fingerprint;
  delta::MethodSpec bitfit;
  bitfit.kind = delta::MethodKind::kBitFit;
  bitfit.config = {{"targets", {"encoder.layer.0.output.dense"}}};
  bitfit.tensors["encoder.layer.0.output.dense.bias"] = delta::testing::RandomTensor({32}, 0.1, seed);
  c.methods.push_back(bitfit);
  return c;
}

void Write(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

class DirectoryDeltaResolverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = delta::testing::TinyBert();
    ASSERT_NE(model_, nullptr);
    dir_ = testing::MakeTempDir();
    ::mkdir((dir_ + "/acme").c_str(), 0755);
    ::mkdir((dir_ + "/Bad Tenant").c_str(), 0755);
    Write(dir_ + "/sentiment.dpack", *delta::SerializePack(BitFitPack(*model_, "sentiment", 1)));
    Write(dir_ + "/acme/sentiment.dpack", *delta::SerializePack(BitFitPack(*model_, "acme-sentiment", 2)));
    Write(dir_ + "/Bad Tenant/x.dpack", *delta::SerializePack(BitFitPack(*model_, "x", 3)));
    Write(dir_ + "/UPPER.dpack", *delta::SerializePack(BitFitPack(*model_, "upper", 4)));
    Write(dir_ + "/garbage.dpack", "garbage");
    Write(dir_ + "/notes.txt", "not a pack: ignored");
  }
  std::shared_ptr<const model::Model> model_;
  std::string dir_;
};

TEST_F(DirectoryDeltaResolverTest, LoadsPacksPerTenantAndReportsTheOnesItSkips) {
  DirectoryDeltaResolver::LoadReport report;
  auto resolver = DirectoryDeltaResolver::Create(dir_, *model_, {}, &report);
  ASSERT_TRUE(resolver.ok()) << resolver.status();
  EXPECT_EQ(report.loaded, 2);
  EXPECT_EQ((*resolver)->num_packs(), 2);
  ASSERT_EQ(report.failed.size(), 3u);  // Bad Tenant/, UPPER.dpack, garbage.dpack
  std::string all;
  for (const auto& [path, why] : report.failed) all += path + ": " + why + "\n";
  EXPECT_THAT(all, HasSubstr("Bad Tenant"));
  EXPECT_THAT(all, HasSubstr("UPPER.dpack"));
  EXPECT_THAT(all, HasSubstr("garbage.dpack"));

  TaskSelector sentiment;
  sentiment.task = "sentiment";
  auto mine = (*resolver)->Resolve("", sentiment);
  auto acme = (*resolver)->Resolve("acme", sentiment);
  ASSERT_TRUE(mine.ok() && acme.ok());
  EXPECT_EQ((*mine)->manifest().name, "sentiment");
  EXPECT_EQ((*acme)->manifest().name, "acme-sentiment");
  EXPECT_NE((*mine)->digest(), (*acme)->digest());

  // By digest: only within the tenant.
  TaskSelector by_digest;
  by_digest.digest = (*acme)->digest();
  EXPECT_TRUE((*resolver)->Resolve("acme", by_digest).ok());
  EXPECT_EQ((*resolver)->Resolve("", by_digest).status().code(), absl::StatusCode::kNotFound);
  // Task and digest must agree.
  by_digest.task = "sentiment";
  EXPECT_EQ((*resolver)->Resolve("", by_digest).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(DirectoryDeltaResolverTest, RejectsMissingDirectoriesAndBadSelectors) {
  EXPECT_EQ(DirectoryDeltaResolver::Create(dir_ + "/nope", *model_, {}, nullptr).status().code(),
            absl::StatusCode::kNotFound);
  auto resolver = DirectoryDeltaResolver::Create(dir_, *model_, {}, nullptr);
  ASSERT_TRUE(resolver.ok());
  TaskSelector traversal;
  traversal.task = "../sentiment";
  EXPECT_EQ((*resolver)->Resolve("", traversal).status().code(), absl::StatusCode::kInvalidArgument);
  TaskSelector label;
  label.task = "sentiment";
  label.label = "prod";
  EXPECT_EQ((*resolver)->Resolve("", label).status().code(), absl::StatusCode::kFailedPrecondition);
  TaskSelector version;
  version.task = "sentiment";
  version.version = 3;
  EXPECT_EQ((*resolver)->Resolve("", version).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(IsValidNameTest, AcceptsLowercaseNamesAndRejectsPathsAndOddCharacters) {
  for (const char* good : {"a", "sentiment", "sst2-lora_v1.2", "0day"}) EXPECT_TRUE(IsValidName(good)) << good;
  for (const char* bad : {"", ".", "..", "../x", "a/b", "Upper", "-x", "_x", ".hidden", "sp ace", "é"}) {
    EXPECT_FALSE(IsValidName(bad)) << bad;
  }
  EXPECT_FALSE(IsValidName(std::string(65, 'a')));
}

}  // namespace
}  // namespace inference
}  // namespace deltaserve
