// `deltactl admin` end to end: the built binary edits a tenants file, and an Authenticator reading that file
// accepts the token it printed until it is revoked.
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/auth/authenticator.h"
#include "server/auth/tenants.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::CommandResult;
using ::deltaserve::testing::DeltactlBinary;
using ::deltaserve::testing::MakeTempDir;
using ::deltaserve::testing::RunCommand;
using ::testing::HasSubstr;

class DeltactlAdminTest : public ::testing::Test {
 protected:
  void SetUp() override { path_ = MakeTempDir() + "/tenants.json"; }

  CommandResult Admin(std::vector<std::string> args) {
    std::vector<std::string> argv = {DeltactlBinary(), "--tenants_file=" + path_, "admin"};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, "", absl::Seconds(60));
  }

  absl::StatusOr<auth::Caller> AuthenticateWith(const std::string& token) {
    auth::Authenticator::Options options;
    options.tenants_file = path_;
    options.reload_interval = absl::ZeroDuration();
    auto authenticator = auth::Authenticator::Create(options);
    if (!authenticator.ok()) return authenticator.status();
    return (*authenticator)->Authenticate("Bearer " + token, {});
  }

  std::string path_;
};

TEST_F(DeltactlAdminTest, CreatedTokenAuthenticatesUntilRevoked) {
  CommandResult r = Admin({"tenant", "add", "acme"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Admin({"tenant", "quota", "acme", "max_concurrent_requests=3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = Admin({"token", "create", "acme", "--description=ci"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string token(absl::StripAsciiWhitespace(r.out));
  ASSERT_TRUE(auth::TokenId(token).has_value()) << r.out;
  EXPECT_THAT(r.err, HasSubstr("cannot be shown again"));
  const std::string id = *auth::TokenId(token);

  auto caller = AuthenticateWith(token);
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->tenant, "acme");
  EXPECT_FALSE(caller->admin);
  EXPECT_EQ(caller->quota.max_concurrent_requests, 3);

  // Listings never show the secret or its hash.
  r = Admin({"token", "ls"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(id));
  EXPECT_THAT(r.out, HasSubstr("ci"));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr(token.substr(17))));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr(auth::HashToken(token))));

  r = Admin({"token", "revoke", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  caller = AuthenticateWith(token);
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("revoked"));

  r = Admin({"token", "revoke", id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("already revoked"));
}

TEST_F(DeltactlAdminTest, AdminRoleAndTenantListing) {
  ASSERT_EQ(Admin({"tenant", "add", "ops", "--role=admin"}).exit_code, 0);
  CommandResult r = Admin({"token", "create", "ops"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto caller = AuthenticateWith(std::string(absl::StripAsciiWhitespace(r.out)));
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_TRUE(caller->admin);
  r = Admin({"tenant", "ls"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, ::testing::ContainsRegex("ops +admin +1"));
}

TEST_F(DeltactlAdminTest, ErrorsAndUsage) {
  // Without a file, only `tenant add` works.
  CommandResult r = Admin({"token", "ls"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  ASSERT_EQ(Admin({"tenant", "add", "acme"}).exit_code, 0);
  r = Admin({"token", "create", "globex"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("no tenant globex: deltactl admin"));
  r = Admin({"tenant", "quota", "acme", "bursts=3"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("tenants.acme.quota.bursts: unknown quota field"));
  r = Admin({"tenant", "add", "acme"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("already exists"));
  EXPECT_EQ(Admin({"tenant", "frobnicate"}).exit_code, 2);
  EXPECT_EQ(Admin({"tenant", "add", "x", "--role=root"}).exit_code, 2);
  EXPECT_EQ(RunCommand({DeltactlBinary(), "admin", "tenant", "ls"}).exit_code, 2);  // no --tenants_file
  r = Admin({"tenant", "rm", "acme"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  auto file = auth::ReadTenantsFile(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(file->tenants.empty());
}

}  // namespace
}  // namespace deltaserve
