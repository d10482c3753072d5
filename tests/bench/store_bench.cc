// store_bench: what moving delta packs through deltaserve costs, measured side by side in one run.
//
// Starts a DeltaServer (use-lite, filesystem store in a temp directory) in this process and, for a LoRA pack of
// about --pack_mb MiB, alternates rounds of
//   - copy:       a plain file copy of the pack on the same disk (read, write, fsync): the floor;
//   - push:       deltactl's path: PushDelta over loopback gRPC (validation against the model, canonical bytes,
//                 fsync'ed blob and journal), each round a new task so every push stores a new version;
//   - validate:   DeltaPack::Load alone (what PushDelta does before storing);
//   - store put:  the store alone (PutBlob into the filesystem store, no gRPC, no validation);
//   - pull:       PullDelta over loopback gRPC (with digest verification on read);
//   - sha256:     hashing the pack in memory (the verification cost per MiB).
// and prints MiB/s of each and the ratios to the file copy.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "delta_store/fs_store.h"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/service/platform.h"
#include "server/service/server.h"
#include "ATen/ATen.h"

ABSL_FLAG(std::string, model_dir, "models/use-lite", "The model directory.");
ABSL_FLAG(double, pack_mb, 16, "Approximate pack size in MiB (LoRA on every linear layer, rank chosen to fit).");
ABSL_FLAG(int, rounds, 5, "Rounds of each path.");
ABSL_FLAG(std::string, dir, "", "Where the store and the copies go (default: a new directory under /tmp).");

namespace {

double MiB(int64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

// A LoRA pack on every linear module of `model`, rank picked so the pack is about `mib` MiB.
std::string MakePack(const deltaserve::model::Model& model, double mib) {
  int64_t per_rank = 0;
  for (const auto& m : model.modules()) {
    if (m.kind == deltaserve::model::ModuleKind::kLinear) per_rank += (m.in_features + m.out_features) * 4;
  }
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(mib * (1 << 20) / per_rank));
  deltaserve::delta::PackContents c;
  c.manifest.name = "store-bench";
  c.manifest.backbone_family = model.info().family;
  c.manifest.backbone_fingerprint = model.info().fingerprint;
  deltaserve::delta::MethodSpec lora;
  lora.kind = deltaserve::delta::MethodKind::kLora;
  std::vector<std::string> targets;
  for (const auto& m : model.modules()) {
    if (m.kind != deltaserve::model::ModuleKind::kLinear) continue;
    targets.push_back(m.name);
    lora.tensors[m.name + ".lora_A"] = at::randn({rank, m.in_features}) * 0.01;
    lora.tensors[m.name + ".lora_B"] = at::randn({m.out_features, rank}) * 0.01;
  }
  lora.config = {{"rank", rank}, {"alpha", rank}, {"targets", targets}};
  c.methods.push_back(lora);
  auto bytes = deltaserve::delta::SerializePack(c);
  if (!bytes.ok()) {
    std::fprintf(stderr, "store_bench: %s\n", bytes.status().ToString().c_str());
    std::exit(1);
  }
  return *bytes;
}

// Reads `from` and writes it to `to` with fsync: what `cp` + `sync` costs.
void CopyFile(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY);
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char> buffer(1 << 20);
  ssize_t n;
  while ((n = ::read(in, buffer.data(), buffer.size())) > 0) {
    if (::write(out, buffer.data(), static_cast<size_t>(n)) != n) break;
  }
  ::fsync(out);
  ::close(in);
  ::close(out);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (auto st = deltaserve::SelectBlas("openblas", argv); !st.ok()) {
    std::fprintf(stderr, "store_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  std::string dir = absl::GetFlag(FLAGS_dir);
  if (dir.empty()) {
    char tmpl[] = "/tmp/deltaserve-store-bench.XXXXXX";
    dir = ::mkdtemp(tmpl);
  }
  deltaserve::service::DeltaServer::Options options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_address = "";
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.store_dir = dir + "/store";
  options.store.max_blob_bytes = int64_t{1} << 30;
  options.deltas.cache_bytes = 0;  // every pushed pack is evicted at once: measure the store, not the cache
  options.max_receive_message_bytes = 4 << 20;
  auto server = deltaserve::service::DeltaServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "store_bench: %s\n", server.status().ToString().c_str());
    return 1;
  }
  const std::string pack = MakePack((*server)->model(), absl::GetFlag(FLAGS_pack_mb));
  const std::string pack_file = dir + "/pack.dpack";
  if (!deltaserve::WriteFileAtomically(pack_file, pack).ok()) return 1;
  deltaserve::client::DeltaserveClient::Options copts;
  copts.target = absl::StrCat("127.0.0.1:", (*server)->port());
  copts.timeout = absl::Seconds(600);
  deltaserve::client::DeltaserveClient client(copts);
  auto side_store = deltaserve::store::OpenFileSystemStore(dir + "/side-store");
  if (!side_store.ok()) return 1;

  const int rounds = absl::GetFlag(FLAGS_rounds);
  double copy_s = 0, push_s = 0, put_s = 0, pull_s = 0, hash_s = 0, load_s = 0;
  std::string digest;
  for (int r = 0; r < rounds; ++r) {
    absl::Time t = absl::Now();
    CopyFile(pack_file, dir + "/copy.dpack");
    copy_s += absl::ToDoubleSeconds(absl::Now() - t);

    deltaserve::v1::PushDeltaHeader header;
    header.set_task(absl::StrCat("bench-", r));
    t = absl::Now();
    auto pushed = client.PushDelta(header, pack);
    push_s += absl::ToDoubleSeconds(absl::Now() - t);
    if (!pushed.ok()) {
      std::fprintf(stderr, "store_bench: push: %s\n", pushed.status().ToString().c_str());
      return 1;
    }
    digest = pushed->version().digest();

    // A fresh blob each round (one changed byte), or the store would answer "already stored".
    std::string unique = pack;
    unique[unique.size() - 1] = static_cast<char>(r);
    t = absl::Now();
    if (!deltaserve::store::PutBlob(**side_store, unique).ok()) return 1;
    put_s += absl::ToDoubleSeconds(absl::Now() - t);

    std::string pulled;
    t = absl::Now();
    auto version = client.PullDelta("", absl::StrCat("bench-", r), &pulled);
    pull_s += absl::ToDoubleSeconds(absl::Now() - t);
    if (!version.ok()) {
      std::fprintf(stderr, "store_bench: pull: %s\n", version.status().ToString().c_str());
      return 1;
    }

    t = absl::Now();
    auto loaded = deltaserve::delta::DeltaPack::Load(pack, (*server)->model(), {});
    load_s += absl::ToDoubleSeconds(absl::Now() - t);
    if (!loaded.ok()) return 1;

    t = absl::Now();
    const std::string h = deltaserve::Sha256Digest(pack);
    hash_s += absl::ToDoubleSeconds(absl::Now() - t);
    if (h.empty()) return 1;
  }
  const double mib = MiB(static_cast<int64_t>(pack.size())) * rounds;
  const double load = mib / load_s;
  const double copy = mib / copy_s, push = mib / push_s, put = mib / put_s, pull = mib / pull_s, sha = mib / hash_s;
  std::printf("pack: %.1f MiB (LoRA on every linear layer of %s), %d rounds, store in %s\n\n",
              MiB(static_cast<int64_t>(pack.size())), (*server)->model().info().name.c_str(), rounds, dir.c_str());
  std::printf("| path | MiB/s | ratio to file copy |\n|---|---:|---:|\n");
  std::printf("| file copy (read + write + fsync) | %.0f | 1.00 |\n", copy);
  std::printf("| PushDelta over gRPC (validate + store) | %.0f | %.2f |\n", push, push / copy);
  std::printf("| store put alone (hash + write + fsync + rename) | %.0f | %.2f |\n", put, put / copy);
  std::printf("| pack validation alone (parse, checks, bind to the model, canonical bytes) | %.0f | %.2f |\n", load,
              load / copy);
  std::printf("| PullDelta over gRPC (verified read) | %.0f | %.2f |\n", pull, pull / copy);
  std::printf("| sha256 in memory | %.0f | %.2f |\n", sha, sha / copy);
  std::printf("\ndigest verification: %.2f ms per MiB\n", 1000.0 / sha);
  (*server)->Shutdown(absl::ZeroDuration());
  return 0;
}
