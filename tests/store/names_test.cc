// Tenant/task/label names and the textual reference forms (store.h).
#include <string>
#include <vector>

#include "delta_store/store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace store {
namespace {

using ::testing::HasSubstr;

const std::string kDigest = Sha256Digest("pack");

TEST(NamesTest, AcceptsLowercaseLettersDigitsDotsUnderscoresAndDashes) {
  for (const std::string& name : std::vector<std::string>{"a", "0", "acme", "task-1", "v1.2_rc", "9lives",
                                                          std::string(64, 'z')}) {
    EXPECT_TRUE(IsValidName(name)) << name;
  }
}

TEST(NamesTest, RejectsNamesThatCouldEscapeAPathOrReadAsSomethingElse) {
  for (const std::string& name :
       {std::string(""), std::string("."), std::string(".."), std::string("../x"), std::string("a/b"),
        std::string("a\\b"), std::string(".hidden"), std::string("-flag"), std::string("_x"), std::string("Acme"),
        std::string("a b"), std::string("a\0b", 3), std::string("a:b"), std::string("a@b"),
        std::string(65, 'a'), std::string("caf\xc3\xa9")}) {
    EXPECT_FALSE(IsValidName(name)) << name;
    EXPECT_FALSE(IsValidLabel(name)) << name;
  }
}

TEST(NamesTest, LabelsMustNotBeAllDigits) {
  EXPECT_TRUE(IsValidLabel("prod"));
  EXPECT_TRUE(IsValidLabel("v2"));
  EXPECT_TRUE(IsValidLabel("2024-01"));
  EXPECT_FALSE(IsValidLabel("2"));
  EXPECT_FALSE(IsValidLabel("007"));
}

TEST(NamesTest, CheckNameSaysWhatIsWrong) {
  EXPECT_TRUE(CheckName("tenant", "acme").ok());
  absl::Status status = CheckName("tenant", "../etc");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("tenant \"../etc\" is not a valid name"));
  EXPECT_THAT(status.message(), HasSubstr("1-64"));
  // Long or binary input is escaped and shortened.
  status = CheckName("task", std::string(500, '\x01'));
  EXPECT_LT(status.message().size(), 500u);
  EXPECT_THAT(status.message(), HasSubstr("\\x01"));
}

TEST(ParseRefTest, ParsesEveryForm) {
  absl::StatusOr<Ref> ref = ParseRef(kDigest, "");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->digest, kDigest);
  EXPECT_EQ(ref->tenant, "");

  ref = ParseRef("summarize", "acme");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->tenant, "acme");
  EXPECT_EQ(ref->task, "summarize");
  EXPECT_EQ(ref->version, 0);
  EXPECT_EQ(ref->label, "");

  ref = ParseRef("beta/summarize", "acme");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->tenant, "beta");

  ref = ParseRef("acme/summarize@3", "");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->version, 3);

  ref = ParseRef("acme/summarize:prod", "");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->label, "prod");

  ref = ParseRef("summarize:latest", "acme");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->label, "latest");

  ref = ParseRef("acme/summarize@" + kDigest, "");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->task, "summarize");
  EXPECT_EQ(ref->digest, kDigest);
  EXPECT_EQ(ref->version, 0);
}

TEST(ParseRefTest, RejectsMalformedReferences) {
  for (const std::string& text :
       {std::string(""), std::string("summarize"), std::string("/x"), std::string("acme/"),
        std::string("a/b/c"), std::string("../x"), std::string("acme/../x"), std::string("Acme/x"),
        std::string("acme/x@"), std::string("acme/x@0"), std::string("acme/x@-1"), std::string("acme/x@+1"),
        std::string("acme/x@1.5"), std::string("acme/x@99999999999999999999"), std::string("acme/x:"),
        std::string("acme/x:12"), std::string("acme/x:Prod"), std::string("acme/x:a:b"), std::string("acme/x@1@2"),
        std::string("sha256:abc"), std::string("acme/x@sha256:abc"), "acme/x@" + kDigest + "0",
        "sha256:" + std::string(64, 'A')}) {
    absl::StatusOr<Ref> ref = ParseRef(text, "");
    EXPECT_EQ(ref.status().code(), absl::StatusCode::kInvalidArgument) << "\"" << text << "\"";
  }
  absl::Status status = ParseRef("acme/x@zero", "").status();
  EXPECT_THAT(status.message(), HasSubstr("version"));
  EXPECT_THAT(status.message(), HasSubstr("tenant/task@<version>"));
}

TEST(ParseRefTest, FormatRefIsItsInverse) {
  for (const std::string& text : {kDigest, std::string("acme/summarize"), std::string("acme/summarize@12"),
                                  std::string("acme/summarize:canary"), "acme/summarize@" + kDigest}) {
    absl::StatusOr<Ref> ref = ParseRef(text, "default");
    ASSERT_TRUE(ref.ok()) << ref.status();
    EXPECT_EQ(FormatRef(*ref), text);
  }
  absl::StatusOr<Ref> ref = ParseRef("summarize@2", "acme");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(FormatRef(*ref), "acme/summarize@2");
}

}  // namespace
}  // namespace store
}  // namespace deltaserve
