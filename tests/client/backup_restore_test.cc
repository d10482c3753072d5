// Integration: `deltactl backup` and `deltactl restore` against real servers (docs/OPERATIONS.md, "Backup and
// restore"). A store with two tenants, several tasks, labels and a deleted version is backed up once (shared by
// the tests); restored into fresh servers it gives the same digests, labels on the same digests and the same
// Classify outputs, with versions renumbered where the source had gaps; a second restore adds nothing; a damaged
// blob stops a restore before it pushes anything; a pack of another backbone is refused alone; an existing backup is not overwritten by accident; a filesystem
// store moves to a shared registry store; with authentication a tenant backs up only its own tenant.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "deltaserve/v1/deltas.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/auth/tenants.h"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "tests/server/server_process.h"
#include "tests/server/test_packs.h"
#include "tests/store/local_registry.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::CommandResult;
using ::deltaserve::testing::LoraHeadPack;
using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
namespace pb = ::deltaserve::v1;

const std::vector<std::string> kTexts = {"a movie I will remember", "dull, slow and far too long"};

// What a tenant's store holds, by name: task -> digests in version order, and task:label -> digest.
struct Snapshot {
  std::map<std::string, std::vector<std::string>> digests;
  std::map<std::string, std::string> labels;
  std::map<std::string, std::vector<int64_t>> numbers;
  bool operator==(const Snapshot& o) const { return digests == o.digests && labels == o.labels; }
};

std::ostream& operator<<(std::ostream& os, const Snapshot& s) {
  for (const auto& [task, digests] : s.digests) {
    os << task << ":";
    for (const std::string& d : digests) os << " " << d.substr(7, 8);
    os << "\n";
  }
  for (const auto& [label, digest] : s.labels) os << label << " -> " << digest.substr(7, 8) << "\n";
  return os;
}

std::unique_ptr<client::DeltaserveClient> Connect(const ServerProcess& server, const std::string& token = "") {
  client::DeltaserveClient::Options options;
  options.target = server.address();
  options.timeout = absl::Seconds(60);
  options.token = token;
  return std::make_unique<client::DeltaserveClient>(options);
}

absl::StatusOr<Snapshot> Take(client::DeltaserveClient& c, const std::vector<std::string>& tenants) {
  Snapshot s;
  for (const std::string& tenant : tenants) {
    pb::ListDeltasRequest request;
    request.set_tenant(tenant);
    request.set_page_size(1000);
    auto listed = c.ListDeltas(request);
    if (!listed.ok()) return listed.status();
    for (const pb::DeltaVersion& v : listed->versions()) {
      const std::string task = absl::StrCat(v.tenant(), "/", v.task());
      s.digests[task].push_back(v.digest());
      s.numbers[task].push_back(v.version());
      for (const std::string& label : v.labels()) s.labels[absl::StrCat(task, ":", label)] = v.digest();
    }
  }
  return s;
}

// Label scores of kTexts on `tenant`'s `ref`, flattened.
absl::StatusOr<std::vector<float>> Scores(client::DeltaserveClient& c, const std::string& tenant,
                                          const std::string& ref) {
  pb::ClassifyRequest request;
  request.set_tenant(tenant);
  request.mutable_task()->set_task(ref);
  for (const std::string& t : kTexts) request.add_texts(t);
  auto r = c.Classify(request);
  if (!r.ok()) return r.status();
  std::vector<float> out;
  for (const auto& result : r->results()) {
    for (const auto& l : result.labels()) out.push_back(l.label() == "pos" ? l.score() : -l.score());
  }
  return out;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class BackupRestoreTest : public ::testing::Test {
 protected:
  // The source server and its backup, made once for the suite.
  struct Source {
    std::unique_ptr<ServerProcess> server;
    std::string backup;  // the directory
    nlohmann::json summary;
    Snapshot snapshot;
  };

  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::UseLiteModelDir());
    if (model_dir_->empty()) return;
    auto loaded = model::LoadModel(*model_dir_, {});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->release();
  }
  static void TearDownTestSuite() {
    delete source_;
    source_ = nullptr;
  }

  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  }

  static std::unique_ptr<ServerProcess> StartServer(std::vector<std::string> extra) {
    std::vector<std::string> args = {"--model_dir=" + *model_dir_, "--max_pack_bytes=400000",
                                     "--max_queue_delay_ms=1"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(args);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }
  static std::unique_ptr<ServerProcess> FreshServer() {
    return StartServer({"--store_dir=" + testing::MakeTempDir() + "/store"});
  }

  static std::string Pack(const std::string& name, uint64_t seed) { return LoraHeadPack(*model_, name, seed); }

  static absl::StatusOr<pb::PushDeltaResponse> Push(client::DeltaserveClient& c, const std::string& tenant,
                                                    const std::string& task, const std::string& bytes,
                                                    std::vector<std::string> labels = {}) {
    pb::PushDeltaHeader header;
    header.set_tenant(tenant);
    header.set_task(task);
    for (const std::string& l : labels) header.add_labels(l);
    return c.PushDelta(header, bytes);
  }

  static CommandResult Deltactl(const ServerProcess* server, std::vector<std::string> args) {
    args.insert(args.begin(), testing::DeltactlBinary());
    if (server != nullptr) args.insert(args.begin() + 1, "--server=" + server->address());
    return testing::RunCommand(args);
  }

  // default/sentiment: v1 (prod), v2 (deleted), v3 (canary, latest); default/topic: v1 (prod), v2;
  // acme/sentiment: v1 (the same pack as default/sentiment@1), v2 (prod); acme/reviews: v1.
  static const Source* TheSource() {
    if (source_ != nullptr) return source_->server ? source_ : nullptr;
    source_ = new Source;
    source_->server = FreshServer();
    if (!source_->server) return nullptr;
    auto c = Connect(*source_->server);
    const std::vector<std::tuple<std::string, std::string, std::string, uint64_t, std::vector<std::string>>> pushes =
        {{"default", "sentiment", "s1", 1, {"prod"}}, {"default", "sentiment", "s2", 2, {}},
         {"default", "sentiment", "s3", 3, {"canary"}}, {"default", "topic", "t1", 4, {"prod"}},
         {"default", "topic", "t2", 5, {}},          {"acme", "sentiment", "s1", 1, {}},
         {"acme", "sentiment", "a2", 6, {"prod"}},   {"acme", "reviews", "r1", 7, {}}};
    for (const auto& [tenant, task, name, seed, labels] : pushes) {
      auto pushed = Push(*c, tenant, task, Pack(name, seed), labels);
      EXPECT_TRUE(pushed.ok()) << pushed.status();
    }
    pb::DeleteVersionRequest del;
    del.set_tenant("default");
    del.set_task("sentiment");
    del.set_version(2);
    EXPECT_TRUE(c->DeleteVersion(del).ok());
    auto snapshot = Take(*c, {"default", "acme"});
    EXPECT_TRUE(snapshot.ok()) << snapshot.status();
    if (snapshot.ok()) source_->snapshot = *snapshot;
    source_->backup = testing::MakeTempDir() + "/backup";
    CommandResult backup = Deltactl(source_->server.get(),
                                    {"backup", "--out=" + source_->backup, "--tenants=default,acme"});
    EXPECT_EQ(backup.exit_code, 0) << backup.err;
    if (backup.exit_code != 0) {
      source_->server.reset();
      return nullptr;
    }
    source_->summary = nlohmann::json::parse(backup.out);
    return source_;
  }

  static std::string* model_dir_;
  static const model::Model* model_;
  static Source* source_;
};

std::string* BackupRestoreTest::model_dir_ = nullptr;
const model::Model* BackupRestoreTest::model_ = nullptr;
BackupRestoreTest::Source* BackupRestoreTest::source_ = nullptr;

TEST_F(BackupRestoreTest, RestoredStoreHasTheSameDigestsLabelsAndOutputs) {
  const Source* source = TheSource();
  ASSERT_NE(source, nullptr);
  // The backup: 7 versions (not the deleted one), 6 distinct packs, 4 user labels.
  EXPECT_EQ(source->summary["tenants"], 2);
  EXPECT_EQ(source->summary["tasks"], 4);
  EXPECT_EQ(source->summary["versions"], 7);
  EXPECT_EQ(source->summary["blobs"], 6);
  EXPECT_EQ(source->summary["labels"], 4);
  auto manifest = ReadJsonObject(source->backup + "/manifest.json");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ((*manifest)["format_version"], 1);
  EXPECT_THAT((*manifest)["server"]["backbone_fingerprint"].get<std::string>(), HasSubstr("sha256:"));
  for (const auto& [task, digests] : source->snapshot.digests) {
    for (const std::string& d : digests) EXPECT_TRUE(FileExists(source->backup + "/blobs/sha256-" + d.substr(7)));
  }
  EXPECT_FALSE(FileExists(source->backup + ".tmp/manifest.json"));

  auto target = FreshServer();
  ASSERT_TRUE(target);
  CommandResult restore = Deltactl(target.get(), {"restore", source->backup});
  ASSERT_EQ(restore.exit_code, 0) << restore.err;
  const nlohmann::json summary = nlohmann::json::parse(restore.out);
  EXPECT_EQ(summary["restored"], 7);
  EXPECT_EQ(summary["already_present"], 0);
  EXPECT_EQ(summary["labels_set"], 4);
  EXPECT_EQ(summary["failed"], 0);
  // default/sentiment had versions 1 and 3: 3 becomes 2. Every other task keeps its numbers.
  EXPECT_EQ(summary["renumbered"], nlohmann::json::parse(R"({"default/sentiment": {"3": 2}})"));
  EXPECT_THAT(restore.err, HasSubstr("default/sentiment: versions renumbered by the store: 3 -> 2"));

  auto c_src = Connect(*source->server);
  auto c_dst = Connect(*target);
  auto restored = Take(*c_dst, {"default", "acme"});
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(*restored, source->snapshot) << "restored:\n" << *restored << "source:\n" << source->snapshot;
  EXPECT_EQ(restored->numbers["default/sentiment"], (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(source->snapshot.numbers.at("default/sentiment"), (std::vector<int64_t>{1, 3}));

  for (const auto& [tenant, ref] : std::vector<std::pair<std::string, std::string>>{
           {"default", "sentiment:prod"}, {"default", "sentiment:canary"}, {"default", "topic"},
           {"acme", "sentiment:prod"}, {"acme", "reviews"}, {"acme", "sentiment@1"}}) {
    auto before = Scores(*c_src, tenant, ref);
    auto after = Scores(*c_dst, tenant, ref);
    ASSERT_TRUE(before.ok() && after.ok()) << tenant << "/" << ref << ": " << before.status() << after.status();
    ASSERT_EQ(before->size(), after->size());
    for (size_t i = 0; i < before->size(); ++i) EXPECT_NEAR((*before)[i], (*after)[i], 1e-5) << tenant << "/" << ref;
  }
  // The digest reference keeps working after the renumbering.
  const std::string canary = source->snapshot.labels.at("default/sentiment:canary");
  auto by_digest = c_dst->GetDelta("default", "sentiment@" + canary);
  ASSERT_TRUE(by_digest.ok()) << by_digest.status();
  EXPECT_EQ(by_digest->version().version(), 2);
}

TEST_F(BackupRestoreTest, SecondRestoreAddsNothing) {
  const Source* source = TheSource();
  ASSERT_NE(source, nullptr);
  auto target = FreshServer();
  ASSERT_TRUE(target);
  CommandResult first = Deltactl(target.get(), {"restore", source->backup});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  auto c = Connect(*target);
  auto after_first = Take(*c, {"default", "acme"});
  ASSERT_TRUE(after_first.ok());

  CommandResult second = Deltactl(target.get(), {"restore", source->backup});
  ASSERT_EQ(second.exit_code, 0) << second.err;
  const nlohmann::json summary = nlohmann::json::parse(second.out);
  EXPECT_EQ(summary["restored"], 0);
  EXPECT_EQ(summary["already_present"], 7);
  EXPECT_EQ(summary["labels_set"], 0);
  EXPECT_EQ(summary["labels_present"], 4);
  EXPECT_EQ(summary["failed"], 0);
  EXPECT_THAT(second.err, HasSubstr("already present"));
  auto after_second = Take(*c, {"default", "acme"});
  ASSERT_TRUE(after_second.ok());
  EXPECT_EQ(*after_second, *after_first);
  EXPECT_EQ(after_second->numbers, after_first->numbers);
}

TEST_F(BackupRestoreTest, DamagedBlobStopsTheRestoreBeforeAnythingIsPushed) {
  const Source* source = TheSource();
  ASSERT_NE(source, nullptr);
  const std::string copy = testing::MakeTempDir() + "/backup";
  std::error_code ec;
  std::filesystem::copy(source->backup, copy, std::filesystem::copy_options::recursive, ec);
  ASSERT_FALSE(ec) << ec.message();
  // Damage the pack of default/topic@2, the last one a restore pushes (tenants, tasks and versions in order): a
  // restore that pushed as it checked would have pushed all the others first.
  const std::string digest = source->snapshot.digests.at("default/topic")[1];
  const std::string blob = copy + "/blobs/sha256-" + digest.substr(7);
  std::string bytes = ReadAll(blob);
  ASSERT_FALSE(bytes.empty());
  bytes[bytes.size() / 2] ^= 1;
  std::ofstream(blob, std::ios::binary | std::ios::trunc) << bytes;

  auto target = FreshServer();
  ASSERT_TRUE(target);
  CommandResult restore = Deltactl(target.get(), {"restore", copy});
  EXPECT_EQ(restore.exit_code, 1);
  EXPECT_THAT(restore.err, HasSubstr(blob));
  EXPECT_THAT(restore.err, HasSubstr("nothing was restored"));
  auto c = Connect(*target);
  auto snapshot = Take(*c, {"default", "acme"});
  ASSERT_TRUE(snapshot.ok());
  EXPECT_THAT(snapshot->digests, IsEmpty());

  // --dry_run finds the same damage, and passes the intact backup.
  CommandResult dry = Deltactl(target.get(), {"restore", copy, "--dry_run"});
  EXPECT_EQ(dry.exit_code, 1);
  CommandResult dry_ok = Deltactl(nullptr, {"restore", source->backup, "--dry_run"});
  ASSERT_EQ(dry_ok.exit_code, 0) << dry_ok.err;
  EXPECT_EQ(nlohmann::json::parse(dry_ok.out)["versions"], 7);
}

// A backup (here written by hand) holding a pack of another backbone: the server refuses that pack, the others are
// restored, and the exit code says something failed.
TEST_F(BackupRestoreTest, PackOfAnotherBackboneIsRefusedAndTheRestContinues) {
  const std::string dir = testing::MakeTempDir() + "/backup";
  std::filesystem::create_directories(dir + "/blobs");
  const std::string foreign = LoraHeadPack(*model_, "foreign", 1, "sha256:" + std::string(64, 'b'));
  std::string good;  // in canonical form, as a backup holds it (what PullDelta returns)
  ASSERT_TRUE(delta::DeltaPack::Load(Pack("good", 2), *model_, {}, &good).ok());
  nlohmann::json versions = nlohmann::json::array();
  int64_t number = 1;
  for (const std::string* bytes : std::vector<const std::string*>{&foreign, &good}) {
    const std::string digest = Sha256Digest(*bytes);
    std::ofstream(dir + "/blobs/sha256-" + digest.substr(7), std::ios::binary) << *bytes;
    versions.push_back({{"version", number++}, {"digest", digest}, {"size_bytes", bytes->size()}});
  }
  const nlohmann::json manifest = {
      {"format", "deltaserve-backup"},
      {"format_version", 1},
      {"tenants",
       {{{"tenant", "default"}, {"tasks", {{{"task", "mixed"}, {"versions", versions}, {"labels", {{"prod", 2}}}}}}}}}};
  std::ofstream(dir + "/manifest.json") << manifest.dump();

  auto target = FreshServer();
  ASSERT_TRUE(target);
  CommandResult restore = Deltactl(target.get(), {"restore", dir});
  EXPECT_EQ(restore.exit_code, 1) << restore.err;
  const nlohmann::json summary = nlohmann::json::parse(restore.out);
  EXPECT_EQ(summary["restored"], 1) << restore.err;
  EXPECT_EQ(summary["failed"], 1);
  EXPECT_EQ(summary["failures"][0]["what"], "default/mixed@1");
  EXPECT_EQ(summary["failures"][0]["code"], "FAILED_PRECONDITION");
  EXPECT_EQ(summary["labels_set"], 1);
  EXPECT_EQ(summary["renumbered"], nlohmann::json::parse(R"({"default/mixed": {"2": 1}})"));
  EXPECT_THAT(restore.err, HasSubstr("default/mixed@1: FAILED_PRECONDITION"));
  auto c = Connect(*target);
  auto got = c->GetDelta("default", "mixed:prod");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->version().digest(), Sha256Digest(good));
}

TEST_F(BackupRestoreTest, BackupRefusesAnExistingNonEmptyDirectory) {
  const std::string dir = testing::MakeTempDir();
  { std::ofstream(dir + "/precious.txt") << "keep me"; }
  // No server needed: the refusal comes first.
  CommandResult refused = Deltactl(nullptr, {"--server=127.0.0.1:1", "backup", "--out=" + dir});
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_THAT(refused.err, HasSubstr("not empty"));
  EXPECT_THAT(refused.err, HasSubstr("--overwrite"));
  EXPECT_EQ(ReadAll(dir + "/precious.txt"), "keep me");

  // --overwrite replaces it once the new backup is complete.
  const Source* source = TheSource();
  ASSERT_NE(source, nullptr);
  CommandResult replaced =
      Deltactl(source->server.get(), {"backup", "--out=" + dir, "--tenants=acme", "--overwrite"});
  ASSERT_EQ(replaced.exit_code, 0) << replaced.err;
  EXPECT_FALSE(FileExists(dir + "/precious.txt"));
  auto manifest = ReadJsonObject(dir + "/manifest.json");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  ASSERT_EQ((*manifest)["tenants"].size(), 1u);
  EXPECT_EQ((*manifest)["tenants"][0]["tenant"], "acme");
  EXPECT_FALSE(FileExists(dir + ".tmp/manifest.json"));
}

// The migration path: a single-replica filesystem store restored into a server on a shared registry store.
TEST_F(BackupRestoreTest, FilesystemStoreMovesToARegistryStore) {
  if (store::LocalRegistry::FindBinary().empty()) GTEST_SKIP() << store::LocalRegistry::kSkipMessage;
  const Source* source = TheSource();
  ASSERT_NE(source, nullptr);
  auto registry = store::LocalRegistry::Start();
  ASSERT_TRUE(registry.ok()) << registry.status();
  auto target = StartServer({"--store_dir=" + testing::MakeTempDir() + "/cache", "--store_url=" + (*registry)->url()});
  ASSERT_TRUE(target);
  CommandResult restore = Deltactl(target.get(), {"restore", source->backup});
  ASSERT_EQ(restore.exit_code, 0) << restore.err;
  EXPECT_EQ(nlohmann::json::parse(restore.out)["restored"], 7);
  auto c = Connect(*target);
  auto restored = Take(*c, {"default", "acme"});
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(*restored, source->snapshot) << "restored:\n" << *restored << "source:\n" << source->snapshot;
  auto before = Scores(*Connect(*source->server), "acme", "sentiment:prod");
  auto after = Scores(*c, "acme", "sentiment:prod");
  ASSERT_TRUE(before.ok() && after.ok()) << before.status() << after.status();
  ASSERT_EQ(before->size(), after->size());
  for (size_t i = 0; i < before->size(); ++i) EXPECT_NEAR((*before)[i], (*after)[i], 1e-5);

  // And back: a backup of the registry store restores into a filesystem store with the same content.
  const std::string again = testing::MakeTempDir() + "/from-registry";
  CommandResult backup = Deltactl(target.get(), {"backup", "--out=" + again, "--tenants=default,acme"});
  ASSERT_EQ(backup.exit_code, 0) << backup.err;
  EXPECT_EQ(nlohmann::json::parse(backup.out)["versions"], 7);
}

TEST_F(BackupRestoreTest, WithAuthenticationATenantBacksUpOnlyItsOwnAndAnAdminAll) {
  if (model_ == nullptr) GTEST_SKIP();
  const std::string dir = testing::MakeTempDir();
  const std::string tenants_file = dir + "/tenants.json";
  auth::TenantsFile file;
  std::map<std::string, std::string> tokens;
  for (const std::string tenant : {"acme", "globex", "ops"}) {
    auto t = auth::GenerateToken("test", absl::Now());
    ASSERT_TRUE(t.ok());
    file.tenants[tenant].tokens.push_back(t->record);
    tokens[tenant] = t->token;
  }
  file.tenants["ops"].role = auth::Role::kAdmin;
  ASSERT_TRUE(auth::WriteTenantsFile(tenants_file, file).ok());
  auto server = StartServer({"--store_dir=" + dir + "/store", "--tenants_file=" + tenants_file});
  ASSERT_TRUE(server);
  auto admin = Connect(*server, tokens["ops"]);
  ASSERT_TRUE(Push(*admin, "acme", "sentiment", Pack("s1", 1), {"prod"}).ok());
  ASSERT_TRUE(Push(*admin, "globex", "topic", Pack("t1", 4)).ok());

  auto tenants_in = [](const std::string& backup) {
    std::vector<std::string> names;
    auto manifest = ReadJsonObject(backup + "/manifest.json");
    if (manifest.ok()) {
      for (const auto& t : (*manifest)["tenants"]) names.push_back(t["tenant"]);
    }
    return names;
  };
  const std::string mine = dir + "/acme-backup";
  CommandResult own = Deltactl(server.get(), {"--token=" + tokens["acme"], "backup", "--out=" + mine});
  ASSERT_EQ(own.exit_code, 0) << own.err;
  EXPECT_EQ(tenants_in(mine), std::vector<std::string>{"acme"});

  CommandResult other = Deltactl(server.get(), {"--token=" + tokens["acme"], "backup", "--out=" + dir + "/no",
                                                "--tenants=globex"});
  EXPECT_EQ(other.exit_code, 1);
  EXPECT_THAT(other.err, HasSubstr("PERMISSION_DENIED"));
  EXPECT_FALSE(FileExists(dir + "/no/manifest.json"));

  const std::string all = dir + "/all-backup";
  CommandResult everyone = Deltactl(server.get(), {"--token=" + tokens["ops"], "backup", "--out=" + all,
                                                   "--tenants_file=" + tenants_file});
  ASSERT_EQ(everyone.exit_code, 0) << everyone.err;
  EXPECT_EQ(tenants_in(all), (std::vector<std::string>{"acme", "globex"}));  // ops has no versions

  // --all_tenants: every tenant without naming them, for an admin only.
  const std::string listed = dir + "/listed-backup";
  CommandResult listed_all =
      Deltactl(server.get(), {"--token=" + tokens["ops"], "backup", "--out=" + listed, "--all_tenants"});
  ASSERT_EQ(listed_all.exit_code, 0) << listed_all.err;
  EXPECT_EQ(tenants_in(listed), (std::vector<std::string>{"acme", "globex"}));
  CommandResult not_admin =
      Deltactl(server.get(), {"--token=" + tokens["acme"], "backup", "--out=" + dir + "/no2", "--all_tenants"});
  EXPECT_EQ(not_admin.exit_code, 1);
  EXPECT_THAT(not_admin.err, HasSubstr("PERMISSION_DENIED"));
  pb::ListDeltasRequest bad;
  bad.set_all_tenants(true);
  bad.set_tenant("acme");
  EXPECT_EQ(admin->ListDeltas(bad).status().code(), absl::StatusCode::kInvalidArgument);

  // The tenant's own backup restores with its own token into a fresh server with the same tenants file.
  auto target = StartServer({"--store_dir=" + dir + "/store2", "--tenants_file=" + tenants_file});
  ASSERT_TRUE(target);
  CommandResult restore = Deltactl(target.get(), {"--token=" + tokens["acme"], "restore", mine});
  ASSERT_EQ(restore.exit_code, 0) << restore.err;
  EXPECT_EQ(nlohmann::json::parse(restore.out)["restored"], 1);
  EXPECT_EQ(nlohmann::json::parse(restore.out)["labels_set"], 1);
}

}  // namespace
}  // namespace deltaserve
