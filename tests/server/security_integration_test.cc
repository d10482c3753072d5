// Integration: tenants and security on a real deltaserve over real gRPC (the real use-lite model, a real store and
// jobs directory, a tenants file, an audit log, TLS certificates made with the `openssl` command).
//
// The isolation matrix: every RPC x {own tenant, another tenant's, no token, bad token, revoked token}. Then: an
// admin acts for any tenant; tokens created and revoked in the tenants file take effect without a restart; a
// tenant over its request rate gets RESOURCE_EXHAUSTED with a retry hint; the audit log records mutations and
// refused attempts without secrets; TLS and mutual TLS (the tenant from the client certificate).
#include <signal.h>

#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "deltaserve/v1/deltas.grpc.pb.h"
#include "deltaserve/v1/inference.grpc.pb.h"
#include "deltaserve/v1/tuning.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/auth/tenants.h"
#include "server/model/model_loader.h"
#include "tests/server/server_process.h"
#include "tests/server/test_certs.h"
#include "tests/server/test_packs.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

std::string SentimentTsv(int n, uint64_t seed) {
  const std::vector<std::string> good = {"great", "wonderful", "excellent", "delightful"};
  const std::vector<std::string> bad = {"awful", "terrible", "dreadful", "boring"};
  std::mt19937_64 rng(seed);
  std::string out = "text\tlabel\n";
  for (int i = 0; i < n; ++i) {
    const bool positive = i % 2 == 0;
    const auto& words = positive ? good : bad;
    out += absl::StrCat("the movie was ", words[rng() % words.size()], "\t", positive ? "pos" : "neg", "\n");
  }
  return out;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The tokens of the test's tenants file.
struct Tokens {
  std::string acme, acme_revoked, globex, ops, limited, small;
  std::string acme_id;
};

// acme (certificate name acme-client; one live and one revoked token), globex, ops (admin), limited (1 request/s,
// burst 2).
absl::StatusOr<Tokens> WriteTenants(const std::string& path) {
  auth::TenantsFile file;
  Tokens tokens;
  auto token = [&](const std::string& tenant, bool revoked) -> absl::StatusOr<std::string> {
    absl::StatusOr<auth::NewToken> t = auth::GenerateToken("test", absl::Now());
    if (!t.ok()) return t.status();
    if (revoked) t->record.revoked = absl::Now();
    file.tenants[tenant].tokens.push_back(t->record);
    return t->token;
  };
  file.tenants["acme"].certificate_names = {"acme-client"};
  file.tenants["globex"];
  file.tenants["ops"].role = auth::Role::kAdmin;
  file.tenants["limited"].quota_overrides = {{"requests_per_second", 1}, {"burst", 2}};
  file.tenants["small"].quota_overrides = {{"max_packs", 1}, {"max_queued_jobs", 1}};
  for (auto [field, tenant, revoked] : {std::tuple{&tokens.acme, "acme", false},
                                        std::tuple{&tokens.acme_revoked, "acme", true},
                                        std::tuple{&tokens.globex, "globex", false},
                                        std::tuple{&tokens.ops, "ops", false},
                                        std::tuple{&tokens.limited, "limited", false},
                                        std::tuple{&tokens.small, "small", false}}) {
    absl::StatusOr<std::string> t = token(tenant, revoked);
    if (!t.ok()) return t.status();
    *field = *t;
  }
  tokens.acme_id = auth::TokenId(tokens.acme).value_or("");
  if (absl::Status s = auth::WriteTenantsFile(path, file); !s.ok()) return s;
  return tokens;
}

class SecurityIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_dir_ = testing::UseLiteModelDir();
    if (model_dir_.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
    dir_ = testing::MakeTempDir();
    tenants_file_ = dir_ + "/tenants.json";
    audit_file_ = dir_ + "/audit.log";
    auto tokens = WriteTenants(tenants_file_);
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    tokens_ = *tokens;
  }

  std::vector<std::string> ServerArgs() const {
    return {"--model_dir=" + model_dir_, "--store_dir=" + dir_ + "/store", "--jobs_dir=" + dir_ + "/jobs",
            "--tenants_file=" + tenants_file_, "--tenants_reload_s=0.05", "--audit_log=" + audit_file_,
            "--training_nice=0", "--max_queue_delay_ms=1"};
  }

  void StartServer(std::vector<std::string> extra = {}, client::DeltaserveClient::Options health = {}) {
    std::vector<std::string> args = ServerArgs();
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(args, absl::Seconds(120), health);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  std::unique_ptr<client::DeltaserveClient> Client(const std::string& token,
                                                   client::DeltaserveClient::Options options = {}) const {
    options.target = server_->address();
    options.timeout = absl::Seconds(60);
    options.token = token;
    return std::make_unique<client::DeltaserveClient>(options);
  }

  // The bytes of a valid pack for the served model.
  std::string Pack(const std::string& name, uint64_t seed) {
    if (model_ == nullptr) {
      auto loaded = model::LoadModel(model_dir_, {});
      EXPECT_TRUE(loaded.ok()) << loaded.status();
      if (!loaded.ok()) return "";
      model_ = std::move(*loaded);
    }
    return testing::LoraHeadPack(*model_, name, seed);
  }

  static absl::Status Push(client::DeltaserveClient& c, const std::string& tenant, const std::string& task,
                           const std::string& bytes, const std::vector<std::string>& labels = {}) {
    pb::PushDeltaHeader header;
    header.set_tenant(tenant);
    header.set_task(task);
    for (const std::string& l : labels) header.add_labels(l);
    return c.PushDelta(header, bytes).status();
  }

  static pb::SubmitJobRequest Job(const std::string& tenant, const std::string& task, const std::string& digest,
                                  int epochs) {
    pb::SubmitJobRequest request;
    request.set_tenant(tenant);
    pb::JobSpec* spec = request.mutable_spec();
    spec->set_task(task);
    spec->add_methods()->set_method("bitfit");
    spec->mutable_train()->set_digest(digest);
    spec->set_validation_fraction(0.25);
    spec->mutable_hyper_parameters()->set_epochs(epochs);
    spec->mutable_hyper_parameters()->set_batch_size(8);
    return request;
  }

  std::vector<nlohmann::json> AuditLines() const {
    std::vector<nlohmann::json> lines;
    for (absl::string_view line : absl::StrSplit(ReadAll(audit_file_), '\n', absl::SkipEmpty())) {
      lines.push_back(nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false));
      EXPECT_FALSE(lines.back().is_discarded()) << line;
    }
    return lines;
  }

  std::string model_dir_, dir_, tenants_file_, audit_file_;
  Tokens tokens_;
  std::shared_ptr<const model::Model> model_;
  std::unique_ptr<ServerProcess> server_;
};

// One RPC of the matrix: `call` makes it as `c`; with `other` it aims at globex's tenant or objects.
struct Rpc {
  std::string name;
  std::function<absl::Status(client::DeltaserveClient& c, bool other)> call;
  absl::StatusCode other_code;  // what acme gets aiming at globex
};

TEST_F(SecurityIntegrationTest, EveryRpcChecksTheCallersTenant) {
  StartServer();
  auto acme = Client(tokens_.acme);
  auto globex = Client(tokens_.globex);
  const std::string pack = Pack("sentiment", 1);
  ASSERT_TRUE(Push(*acme, "", "sentiment", pack, {"prod"}).ok());
  ASSERT_TRUE(Push(*acme, "", "scratch", Pack("scratch", 2)).ok());
  ASSERT_TRUE(Push(*globex, "", "sentiment", Pack("sentiment", 3), {"prod"}).ok());
  auto acme_data = acme->UploadDataset("", SentimentTsv(40, 1));
  auto globex_data = globex->UploadDataset("", SentimentTsv(40, 2));
  ASSERT_TRUE(acme_data.ok() && globex_data.ok()) << acme_data.status() << globex_data.status();
  auto acme_job = acme->SubmitJob(Job("", "long", acme_data->digest(), 1000));
  auto globex_job = globex->SubmitJob(Job("", "long", globex_data->digest(), 1000));
  ASSERT_TRUE(acme_job.ok() && globex_job.ok()) << acme_job.status() << globex_job.status();
  const std::string acme_job_id = acme_job->job().id(), globex_job_id = globex_job->job().id();
  EXPECT_EQ(acme_job->job().tenant(), "acme");
  EXPECT_EQ(globex_job->job().tenant(), "globex");
  const std::string globex_digest = globex->GetDelta("", "sentiment")->version().digest();

  const std::vector<Rpc> rpcs = {
      {"Embed",
       [](client::DeltaserveClient& c, bool other) {
         pb::EmbedRequest r;
         r.add_texts("hello");
         r.mutable_task()->set_task("sentiment");
         if (other) r.set_tenant("globex");
         return c.Embed(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"Classify",
       [](client::DeltaserveClient& c, bool other) {
         pb::ClassifyRequest r;
         r.add_texts("hello");
         r.mutable_task()->set_task(other ? "globex/sentiment:prod" : "sentiment:prod");
         return c.Classify(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"Classify by digest",
       [&](client::DeltaserveClient& c, bool other) {
         pb::ClassifyRequest r;
         r.add_texts("hello");
         r.mutable_task()->set_digest(other ? globex_digest : acme->GetDelta("", "sentiment")->version().digest());
         return c.Classify(r).status();
       },
       absl::StatusCode::kNotFound},
      {"GetModelInfo", [](client::DeltaserveClient& c, bool) { return c.GetModelInfo().status(); },
       absl::StatusCode::kOk},
      {"Prefetch",
       [](client::DeltaserveClient& c, bool other) {
         pb::PrefetchRequest r;
         if (other) r.set_tenant("globex");
         r.add_tasks()->set_task("sentiment");
         return c.Prefetch(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"PushDelta",
       [&](client::DeltaserveClient& c, bool other) { return Push(c, other ? "globex" : "", "pushed", pack); },
       absl::StatusCode::kPermissionDenied},
      {"GetDelta",
       [](client::DeltaserveClient& c, bool other) {
         return c.GetDelta("", other ? "globex/sentiment" : "sentiment").status();
       },
       absl::StatusCode::kPermissionDenied},
      {"PullDelta",
       [](client::DeltaserveClient& c, bool other) {
         std::string bytes;
         return c.PullDelta(other ? "globex" : "", "sentiment:prod", &bytes).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"ListDeltas",
       [](client::DeltaserveClient& c, bool other) {
         pb::ListDeltasRequest r;
         if (other) r.set_tenant("globex");
         return c.ListDeltas(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"SetLabel",
       [](client::DeltaserveClient& c, bool other) {
         pb::SetLabelRequest r;
         if (other) r.set_tenant("globex");
         r.set_task("sentiment");
         r.set_label("canary");
         r.set_version(1);
         return c.SetLabel(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"DeleteLabel",
       [](client::DeltaserveClient& c, bool other) {
         pb::DeleteLabelRequest r;
         if (other) r.set_tenant("globex");
         r.set_task(other ? "sentiment" : "sentiment");
         r.set_label(other ? "prod" : "canary");
         return c.DeleteLabel(r);
       },
       absl::StatusCode::kPermissionDenied},
      {"DeleteVersion",
       [](client::DeltaserveClient& c, bool other) {
         pb::DeleteVersionRequest r;
         if (other) r.set_tenant("globex");
         r.set_task(other ? "sentiment" : "scratch");
         r.set_version(1);
         return c.DeleteVersion(r);
       },
       absl::StatusCode::kPermissionDenied},
      {"UploadDataset",
       [](client::DeltaserveClient& c, bool other) {
         return c.UploadDataset(other ? "globex" : "", SentimentTsv(20, 9)).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"SubmitJob (tenant)",
       [&](client::DeltaserveClient& c, bool other) {
         auto r = c.SubmitJob(Job(other ? "globex" : "", "short", acme_data->digest(), 1));
         if (r.ok() && !other) acme->CancelJob("", r->job().id()).IgnoreError();
         return r.status();
       },
       absl::StatusCode::kPermissionDenied},
      {"SubmitJob (dataset)",
       [&](client::DeltaserveClient& c, bool other) {
         auto r = c.SubmitJob(Job("", "short", other ? globex_data->digest() : acme_data->digest(), 1));
         if (r.ok() && !other) acme->CancelJob("", r->job().id()).IgnoreError();
         return r.status();
       },
       absl::StatusCode::kNotFound},
      {"GetJob",
       [&](client::DeltaserveClient& c, bool other) {
         return c.GetJob("", other ? globex_job_id : acme_job_id).status();
       },
       absl::StatusCode::kNotFound},
      {"ListJobs",
       [](client::DeltaserveClient& c, bool other) {
         pb::ListJobsRequest r;
         if (other) r.set_tenant("globex");
         return c.ListJobs(r).status();
       },
       absl::StatusCode::kPermissionDenied},
      {"WatchJob",
       [&](client::DeltaserveClient& c, bool other) {
         return c
             .WatchJob("", other ? globex_job_id : acme_job_id, [](const pb::Job&) { return false; },
                       absl::Seconds(30))
             .status();
       },
       absl::StatusCode::kNotFound},
      {"CancelJob",
       [&](client::DeltaserveClient& c, bool other) {
         return c.CancelJob("", other ? globex_job_id : acme_job_id).status();
       },
       absl::StatusCode::kNotFound},
  };

  auto none = Client("");
  auto bad = Client("dst_0123456789ab_" + std::string(43, 'A'));
  auto revoked = Client(tokens_.acme_revoked);
  for (const Rpc& rpc : rpcs) {
    SCOPED_TRACE(rpc.name);
    const absl::Status no_token = rpc.call(*none, false);
    EXPECT_EQ(no_token.code(), absl::StatusCode::kUnauthenticated) << no_token;
    EXPECT_THAT(std::string(no_token.message()), HasSubstr("Bearer"));
    const absl::Status bad_token = rpc.call(*bad, false);
    EXPECT_EQ(bad_token.code(), absl::StatusCode::kUnauthenticated) << bad_token;
    EXPECT_THAT(std::string(bad_token.message()), HasSubstr("unknown API token"));
    const absl::Status revoked_token = rpc.call(*revoked, false);
    EXPECT_EQ(revoked_token.code(), absl::StatusCode::kUnauthenticated) << revoked_token;
    EXPECT_THAT(std::string(revoked_token.message()), HasSubstr("revoked"));
    const absl::Status theirs = rpc.call(*acme, true);
    EXPECT_EQ(theirs.code(), rpc.other_code) << theirs;
    if (rpc.other_code == absl::StatusCode::kPermissionDenied) {
      EXPECT_THAT(std::string(theirs.message()), HasSubstr("globex"));
    }
    const absl::Status own = rpc.call(*acme, false);
    EXPECT_TRUE(own.ok()) << own;
  }

  // Nothing of globex's changed.
  pb::ListDeltasRequest list;
  auto versions = globex->ListDeltas(list);
  ASSERT_TRUE(versions.ok()) << versions.status();
  ASSERT_EQ(versions->versions_size(), 1);
  EXPECT_EQ(versions->versions(0).task(), "sentiment");
  EXPECT_THAT(std::vector<std::string>(versions->versions(0).labels().begin(), versions->versions(0).labels().end()),
              ::testing::Contains("prod"));
  auto job = globex->GetJob("", globex_job_id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_NE(job->state(), pb::JOB_STATE_CANCELLED);
  // acme's own changes happened: its job is cancelled, scratch@1 deleted, a "pushed" task exists.
  auto cancelled = acme->WatchJob("", acme_job_id, nullptr, absl::Seconds(120));  // a running job stops at its next op
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state(), pb::JOB_STATE_CANCELLED);
  EXPECT_EQ(acme->GetDelta("", "scratch@1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(acme->GetDelta("", "pushed").ok());
  globex->CancelJob("", globex_job_id).IgnoreError();

  // The audit log: each mutation with who and the outcome; refused attempts too; never a secret.
  const std::vector<nlohmann::json> audit = AuditLines();
  auto has = [&](const std::string& action, const std::string& code, const std::string& tenant,
                 const std::string& principal) {
    for (const nlohmann::json& e : audit) {
      if (e.value("action", "") == action && e.value("code", "") == code && e.value("tenant", "") == tenant &&
          (principal.empty() || e.value("principal", "") == principal)) {
        return true;
      }
    }
    return false;
  };
  const std::string acme_principal = "token:" + tokens_.acme_id;
  EXPECT_TRUE(has("delta.push", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("label.set", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("label.delete", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("version.delete", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("dataset.upload", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("job.submit", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("job.cancel", "OK", "acme", acme_principal));
  EXPECT_TRUE(has("label.set", "PERMISSION_DENIED", "globex", ""));
  EXPECT_TRUE(has("version.delete", "UNAUTHENTICATED", "", ""));
  EXPECT_TRUE(has("job.cancel", "NOT_FOUND", "acme", acme_principal));
  const std::string text = ReadAll(audit_file_);
  for (const std::string& secret : {tokens_.acme, tokens_.acme_revoked, tokens_.globex}) {
    EXPECT_FALSE(absl::StrContains(text, secret.substr(17))) << "a token's secret is in the audit log";
  }
}

TEST_F(SecurityIntegrationTest, AdminActsForAnyTenant) {
  StartServer();
  auto globex = Client(tokens_.globex);
  ASSERT_TRUE(Push(*globex, "", "sentiment", Pack("sentiment", 3)).ok());
  auto ops = Client(tokens_.ops);
  pb::ListDeltasRequest list;
  list.set_tenant("globex");
  auto versions = ops->ListDeltas(list);
  ASSERT_TRUE(versions.ok()) << versions.status();
  EXPECT_EQ(versions->versions_size(), 1);
  pb::SetLabelRequest label;
  label.set_tenant("globex");
  label.set_task("sentiment");
  label.set_label("prod");
  label.set_version(1);
  EXPECT_TRUE(ops->SetLabel(label).ok());
  EXPECT_TRUE(globex->GetDelta("", "sentiment:prod").ok());
  // Without a tenant an admin acts for its own.
  auto own = ops->ListDeltas(pb::ListDeltasRequest());
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->versions_size(), 0);
}

TEST_F(SecurityIntegrationTest, TokensChangeWithoutARestart) {
  StartServer();
  // A token added to the tenants file with deltactl admin works within the reload interval...
  testing::CommandResult created = testing::RunCommand(
      {testing::DeltactlBinary(), "admin", "token", "create", "globex", "--tenants_file=" + tenants_file_,
       "--description=rotated"});
  ASSERT_EQ(created.exit_code, 0) << created.err;
  const std::string token(absl::StripAsciiWhitespace(created.out));
  ASSERT_TRUE(auth::TokenId(token).has_value()) << created.out;
  auto fresh = Client(token);
  absl::Status status;
  for (absl::Time end = absl::Now() + absl::Seconds(10); absl::Now() < end; absl::SleepFor(absl::Milliseconds(20))) {
    status = fresh->ListDeltas(pb::ListDeltasRequest()).status();
    if (status.ok()) break;
  }
  EXPECT_TRUE(status.ok()) << status;
  // ... and a revoked one stops working as quickly.
  testing::CommandResult revoked = testing::RunCommand(
      {testing::DeltactlBinary(), "admin", "token", "revoke", *auth::TokenId(token), "--tenants_file=" + tenants_file_});
  ASSERT_EQ(revoked.exit_code, 0) << revoked.err;
  for (absl::Time end = absl::Now() + absl::Seconds(10); absl::Now() < end; absl::SleepFor(absl::Milliseconds(20))) {
    status = fresh->ListDeltas(pb::ListDeltasRequest()).status();
    if (!status.ok()) break;
  }
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << status;
  // A broken tenants file keeps the last good one in force.
  { std::ofstream(tenants_file_) << "{ not json"; }
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(Client(tokens_.acme)->ListDeltas(pb::ListDeltasRequest()).ok());
  // The changes are audited.
  bool created_seen = false, revoked_seen = false, failed_seen = false;
  for (const nlohmann::json& e : AuditLines()) {
    created_seen |= e.value("action", "") == "token.create" && e.value("tenant", "") == "globex";
    revoked_seen |= e.value("action", "") == "token.revoke" && e.value("tenant", "") == "globex";
    failed_seen |= e.value("action", "") == "tenants.reload_failed";
  }
  EXPECT_TRUE(created_seen);
  EXPECT_TRUE(revoked_seen);
  EXPECT_TRUE(failed_seen);
}

TEST_F(SecurityIntegrationTest, RequestRateIsLimitedPerTenantWithARetryHint) {
  StartServer();
  // limited: 1 request/s, burst 2. Raw stub, to see the trailing metadata.
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = pb::InferenceService::NewStub(channel);
  grpc::Status last;
  std::string retry_after;
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + tokens_.limited);
    pb::GetModelInfoResponse response;
    last = stub->GetModelInfo(&context, pb::GetModelInfoRequest(), &response);
    auto it = context.GetServerTrailingMetadata().find("retry-after-ms");
    if (it != context.GetServerTrailingMetadata().end()) retry_after = std::string(it->second.data(), it->second.size());
  }
  EXPECT_EQ(last.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << last.error_message();
  EXPECT_THAT(last.error_message(), HasSubstr("request rate"));
  EXPECT_FALSE(retry_after.empty());
  // Other tenants are not affected.
  EXPECT_TRUE(Client(tokens_.acme)->GetModelInfo().ok());
}

TEST_F(SecurityIntegrationTest, TenantsFileQuotasApplyToStoreAndJobs) {
  StartServer();
  auto small = Client(tokens_.small);
  ASSERT_TRUE(Push(*small, "", "first", Pack("first", 1)).ok());
  const absl::Status second = Push(*small, "", "second", Pack("second", 2));
  EXPECT_EQ(second.code(), absl::StatusCode::kResourceExhausted) << second;
  EXPECT_THAT(std::string(second.message()), HasSubstr("quota"));
  // Others are not limited by small's quota.
  auto acme = Client(tokens_.acme);
  EXPECT_TRUE(Push(*acme, "", "first", Pack("first", 1)).ok());
  EXPECT_TRUE(Push(*acme, "", "second", Pack("second", 2)).ok());
  // Jobs: one queued or running at a time.
  auto data = small->UploadDataset("", SentimentTsv(40, 1));
  ASSERT_TRUE(data.ok()) << data.status();
  auto job = small->SubmitJob(Job("", "long", data->digest(), 1000));
  ASSERT_TRUE(job.ok()) << job.status();
  auto refused = small->SubmitJob(Job("", "more", data->digest(), 1));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  small->CancelJob("", job->job().id()).IgnoreError();
}

TEST_F(SecurityIntegrationTest, HealthChecksNeedNoToken) {
  StartServer();
  auto none = Client("");
  auto health = none->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");
}

TEST_F(SecurityIntegrationTest, DeltactlSendsTheToken) {
  StartServer();
  const std::string server = "--server=" + server_->address();
  testing::CommandResult refused = testing::RunCommand({testing::DeltactlBinary(), "ls", server});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.err, HasSubstr("UNAUTHENTICATED"));
  testing::CommandResult flag =
      testing::RunCommand({testing::DeltactlBinary(), "ls", server, "--token=" + tokens_.acme});
  EXPECT_EQ(flag.exit_code, 0) << flag.err;
  testing::CommandResult env = testing::RunCommand(
      {"/usr/bin/env", "DELTASERVE_TOKEN=" + tokens_.acme, testing::DeltactlBinary(), "ls", server});
  EXPECT_EQ(env.exit_code, 0) << env.err;
}

// ---------------------------------------------------------------------------------------------------------------
// TLS.

class TlsIntegrationTest : public SecurityIntegrationTest {
 protected:
  void SetUp() override {
    SecurityIntegrationTest::SetUp();
    if (IsSkipped()) return;
    if (!testing::OpenSslCommandAvailable()) GTEST_SKIP() << "no openssl command";
    auto certs = testing::MakeTestCerts(dir_ + "/certs");
    ASSERT_TRUE(certs.ok()) << certs.status();
    certs_ = *certs;
  }

  client::DeltaserveClient::Options Tls(bool with_client_cert, bool rogue = false) const {
    client::DeltaserveClient::Options o;
    o.tls_ca_file = certs_.ca_cert;
    o.tls_server_name = "localhost";
    if (with_client_cert) {
      o.tls_cert_file = rogue ? certs_.rogue_client_cert : certs_.client_cert;
      o.tls_key_file = rogue ? certs_.rogue_client_key : certs_.client_key;
    }
    return o;
  }

  testing::TestCerts certs_;
};

TEST_F(TlsIntegrationTest, ServesOverTlsAndRefusesPlaintext) {
  StartServer({"--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.server_key}, Tls(false));
  EXPECT_TRUE(Client(tokens_.acme, Tls(false))->ListDeltas(pb::ListDeltasRequest()).ok());
  client::DeltaserveClient::Options plain;
  plain.timeout = absl::Seconds(3);
  auto refused = Client(tokens_.acme, plain)->ListDeltas(pb::ListDeltasRequest());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  // A client that does not trust the server's CA cannot connect either.
  client::DeltaserveClient::Options untrusting = Tls(false);
  untrusting.tls_ca_file = certs_.rogue_ca_cert;
  untrusting.timeout = absl::Seconds(3);
  EXPECT_EQ(Client(tokens_.acme, untrusting)->ListDeltas(pb::ListDeltasRequest()).status().code(),
            absl::StatusCode::kUnavailable);
  // deltactl with --tls_ca.
  testing::CommandResult ls = testing::RunCommand({testing::DeltactlBinary(), "ls", "--server=" + server_->address(),
                                                   "--tls_ca=" + certs_.ca_cert, "--tls_server_name=localhost",
                                                   "--token=" + tokens_.acme});
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
}

TEST_F(TlsIntegrationTest, ClientCertificateNamesTheTenant) {
  StartServer({"--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.server_key,
               "--tls_client_ca=" + certs_.ca_cert},
              Tls(false));
  // acme-client's certificate authenticates as acme, without a token.
  auto acme = Client("", Tls(true));
  ASSERT_TRUE(Push(*acme, "", "sentiment", Pack("sentiment", 1)).ok());
  auto mine = acme->GetDelta("", "sentiment");
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(mine->version().tenant(), "acme");
  EXPECT_EQ(acme->GetDelta("globex", "sentiment").status().code(), absl::StatusCode::kPermissionDenied);
  // A token still wins over the certificate.
  auto as_globex = Client(tokens_.globex, Tls(true));
  EXPECT_EQ(as_globex->GetDelta("", "sentiment").status().code(), absl::StatusCode::kNotFound);
  // No certificate and no token: refused, with what to do.
  EXPECT_EQ(Client("", Tls(false))->GetDelta("", "sentiment").status().code(),
            absl::StatusCode::kUnauthenticated);
  // A certificate of another CA does not get through the handshake.
  client::DeltaserveClient::Options rogue = Tls(true, /*rogue=*/true);
  rogue.timeout = absl::Seconds(3);
  EXPECT_EQ(Client("", rogue)->GetDelta("", "sentiment").status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(TlsIntegrationTest, RequiredClientCertificatesRefuseTokenOnlyClients) {
  StartServer({"--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.server_key,
               "--tls_client_ca=" + certs_.ca_cert, "--tls_require_client_cert"},
              Tls(true));
  client::DeltaserveClient::Options no_cert = Tls(false);
  no_cert.timeout = absl::Seconds(3);
  EXPECT_EQ(Client(tokens_.acme, no_cert)->ListDeltas(pb::ListDeltasRequest()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(Client("", Tls(true))->ListDeltas(pb::ListDeltasRequest()).ok());
}

TEST_F(TlsIntegrationTest, ClientRefusesUnreadableTlsFiles) {
  client::DeltaserveClient::Options options;
  options.tls_ca_file = dir_ + "/missing-ca.pem";
  auto created = client::DeltaserveClient::Create(options);
  EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(created.status().message()), HasSubstr("missing-ca.pem cannot be read"));
  options.tls_ca_file = certs_.ca_cert;
  options.tls_cert_file = certs_.client_cert;  // without its key
  EXPECT_EQ(client::DeltaserveClient::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  testing::CommandResult ls =
      testing::RunCommand({testing::DeltactlBinary(), "ls", "--tls_ca=" + dir_ + "/missing-ca.pem"});
  EXPECT_EQ(ls.exit_code, 2);
  EXPECT_THAT(ls.err, HasSubstr("missing-ca.pem cannot be read"));
}

TEST_F(TlsIntegrationTest, BadTlsSettingsStopTheServerWithAClearMessage) {
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--tls_cert=" + certs_.server_cert}, "needs both a certificate"},
      {{"--tls_cert=" + dir_ + "/missing.pem", "--tls_key=" + certs_.server_key}, "missing.pem cannot be read"},
      {{"--tls_cert=" + tenants_file_, "--tls_key=" + certs_.server_key}, "is not a PEM file"},
      {{"--tls_client_ca=" + certs_.ca_cert}, "need TLS"},
      {{"--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.client_key}, "does not match the certificate"},
      {{"--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.server_key, "--tls_require_client_cert"},
       "needs --tls_client_ca"},
      {{"--tenants_file=" + dir_ + "/no-such-tenants.json"}, "no-such-tenants.json"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.flags[0]);
    std::vector<std::string> args = ServerArgs();
    args.insert(args.end(), c.flags.begin(), c.flags.end());
    auto server = ServerProcess::Start(args, absl::Seconds(60));
    ASSERT_FALSE(server.ok());
    EXPECT_EQ(server.status().code(), absl::StatusCode::kFailedPrecondition) << server.status();  // it exited
    EXPECT_THAT(std::string(server.status().message()), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace deltaserve
