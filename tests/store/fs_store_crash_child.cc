// The process fs_store_crash_test kills: opens the filesystem store at argv[1] and mutates it at random until it
// is killed (or has done kMaxOps operations). Each operation is reported on stdout, one line per write(2) (atomic
// on a pipe), so that the parent knows exactly what was acknowledged:
//   READY                                  the store is open
//   PUSH <tenant> <task> <version> <digest>  PushPack returned OK
//   TRY <tenant> <task> <label> <version>    SetLabel is about to be called (it may land without an ack)
//   LABEL <tenant> <task> <label> <version>  SetLabel returned OK
//   TRYDEL <tenant> <task> <version>         DeleteVersion is about to be called
//   DELETE <tenant> <task> <version>         DeleteVersion returned OK
// Exit status: 0 after kMaxOps operations, 2 on a usage error, 3 when the store fails (message on stderr).
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "delta_store/fs_store.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {
namespace {

constexpr int kMaxOps = 5000;
// A task with more versions than this gets its oldest unlabelled one deleted now and then (keeps the store small).
constexpr size_t kMaxVersionsPerTask = 6;
const char* const kTenants[] = {"acme", "globex"};
const char* const kTasks[] = {"summarize", "translate", "classify"};
const char* const kLabels[] = {"prod", "canary"};

void Report(const std::string& line) {
  const std::string text = line + "\n";
  if (::write(STDOUT_FILENO, text.data(), text.size()) != static_cast<ssize_t>(text.size())) std::_Exit(4);
}

[[noreturn]] void Die(const absl::Status& status, const std::string& what) {
  std::cerr << "fs_store_crash_child: " << what << ": " << status << std::endl;
  std::_Exit(3);
}

template <typename T>
T Pick(std::mt19937_64& rng, const T* items, size_t n) {
  return items[rng() % n];
}

std::vector<VersionInfo> Versions(DeltaStore& store, const std::string& tenant, const std::string& task) {
  ListOptions options;
  options.tenant = tenant;
  options.task = task;
  options.page_size = 1000;
  absl::StatusOr<ListPage> page = store.List(options);
  if (!page.ok()) Die(page.status(), "List");
  return page->versions;
}

// Random bytes: mostly small packs, a quarter of them up to 256 KiB.
std::string RandomPack(std::mt19937_64& rng) {
  const size_t size = rng() % 4 == 0 ? rng() % (256 << 10) : rng() % (16 << 10);
  std::string data(size, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  return data;
}

int Run(const std::string& root, uint64_t seed) {
  std::mt19937_64 rng(seed);
  absl::StatusOr<std::unique_ptr<DeltaStore>> opened = OpenFileSystemStore(root);
  if (!opened.ok()) Die(opened.status(), "OpenFileSystemStore");
  DeltaStore& store = **opened;
  Report("READY");

  std::string last_tenant, last_task, last_pack;
  for (int i = 0; i < kMaxOps; ++i) {
    const std::string tenant = Pick(rng, kTenants, 2);
    const std::string task = Pick(rng, kTasks, 3);
    const int dice = static_cast<int>(rng() % 100);
    if (dice < 60) {
      // Push a new pack, or (sometimes) the previous one again, which must return its existing version.
      const bool again = dice < 8 && !last_pack.empty();
      if (!again) {
        last_tenant = tenant;
        last_task = task;
        last_pack = RandomPack(rng);
      }
      absl::StatusOr<VersionInfo> pushed = PushPack(store, last_tenant, last_task, last_pack);
      if (!pushed.ok()) Die(pushed.status(), "PushPack");
      Report(absl::StrCat("PUSH ", last_tenant, " ", last_task, " ", pushed->version, " ", pushed->digest));
    } else if (dice < 85) {
      const std::vector<VersionInfo> versions = Versions(store, tenant, task);
      if (versions.empty()) continue;
      const int64_t version = versions[rng() % versions.size()].version;
      const std::string label = Pick(rng, kLabels, 2);
      const std::string line = absl::StrCat(tenant, " ", task, " ", label, " ", version);
      Report("TRY " + line);
      absl::Status set = store.SetLabel(tenant, task, label, version);
      if (!set.ok()) Die(set, "SetLabel");
      Report("LABEL " + line);
    } else {
      const std::vector<VersionInfo> versions = Versions(store, tenant, task);
      if (versions.size() <= kMaxVersionsPerTask) continue;
      for (const VersionInfo& v : versions) {
        if (v.labels.empty()) {
          const std::string line = absl::StrCat(tenant, " ", task, " ", v.version);
          Report("TRYDEL " + line);
          absl::Status deleted = store.DeleteVersion(tenant, task, v.version);
          if (!deleted.ok()) Die(deleted, "DeleteVersion");
          Report("DELETE " + line);
          break;
        }
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fs_store_crash_child <store root> <random seed>" << std::endl;
    return 2;
  }
  return deltaserve::store::Run(argv[1], std::strtoull(argv[2], nullptr, 10));
}
