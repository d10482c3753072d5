// deltactl: the command-line client of deltaserve.
//
//   deltactl [--server=HOST:PORT] health
//   deltactl [--server=HOST:PORT] info
//   deltactl [--server=HOST:PORT] embed [--task=T | --digest=sha256:...] [--tokens] [--ids]
//            [--truncation=truncate|error] [TEXT ...]
//   deltactl [--server=HOST:PORT] classify --task=T [--top_k=N] [--pairs] [TEXT ...]
//       (no TEXT: one text per line from stdin; --pairs: each input is TEXT<TAB>PAIR, for pair tasks)
//   deltactl push FILE --task=T [--label=L1,L2]    a pack file becomes the task's next version
//   deltactl pull REF [--output=FILE]              REF: task, task@3, task:prod, sha256:<hex>, tenant/task...
//   deltactl show REF
//   deltactl ls [--task=T]
//   deltactl label TASK@VERSION LABEL              point LABEL at a version
//   deltactl rm TASK@VERSION | TASK:LABEL          delete a version, or a label
//   deltactl prefetch REF...                       load tasks' packs into the server's cache ahead of requests
//   deltactl admin --tenants_file=F tenant ... | token ...   edit the tenants file (deltactl_admin.h)
//   deltactl backup --out=DIR [--tenants=A,B] / restore DIR [--dry_run]   copy the store (deltactl_backup.h)
//
// embed / classify / info print JSON; the store commands and prefetch print a short text for people, JSON with
// --json.
// Errors go to stderr as "deltactl: CODE: message" with exit code 1 (2 for usage).
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "client/deltactl_admin.h"
#include "client/deltactl_backup.h"
#include "client/deltactl_tune.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "deltaserve address (host:port).");
ABSL_FLAG(double, timeout_s, 30, "Deadline of each call, in seconds.");
ABSL_FLAG(std::string, tenant, "",
          "Tenant to act for (default: the token's own; an admin token may name any; without authentication: any).");
ABSL_FLAG(std::string, token, "",
          "API token sent as 'authorization: Bearer <token>' (default: $DELTASERVE_TOKEN; docs/SECURITY.md).");
ABSL_FLAG(bool, tls, false, "Connect with TLS (implied by --tls_ca / --tls_cert).");
ABSL_FLAG(std::string, tls_ca, "", "TLS: PEM CA certificates to verify the server with (default: the system's).");
ABSL_FLAG(std::string, tls_cert, "", "TLS: PEM client certificate (mutual TLS; with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "TLS: PEM private key of the client certificate.");
ABSL_FLAG(std::string, tls_server_name, "", "TLS: the name to verify in the server's certificate (default: host).");
ABSL_FLAG(bool, tokens, false, "embed: also print per-token embeddings.");
ABSL_FLAG(bool, ids, false, "embed: also print the token ids.");
ABSL_FLAG(std::string, truncation, "", "embed: 'truncate' or 'error' for over-long inputs (default: server's).");
ABSL_FLAG(bool, pretty, false, "Indent the JSON output.");
ABSL_FLAG(std::string, task, "",
          "embed / classify: the task (delta pack) to run with (also task@3, task:prod); empty = the base model. "
          "push: the task the pack becomes a version of. ls: only this task.");
ABSL_FLAG(std::string, digest, "", "embed / classify: the delta pack by content digest (sha256:<hex>).");
ABSL_FLAG(int, top_k, 0, "classify: labels per input, best first (0 = all).");
ABSL_FLAG(bool, pairs, false,
          "classify: each input (argument or stdin line) is TEXT<TAB>PAIR, sent as texts + text_pairs for tasks "
          "trained on text pairs (entailment, paraphrase, ...).");
ABSL_FLAG(std::vector<std::string>, label, {}, "push: labels to point at the new version (comma separated).");
ABSL_FLAG(std::string, output, "", "pull: the file to write (\"-\" = stdout; default <task>.v<version>.dpack).");
ABSL_FLAG(bool, json, false, "push / pull / show / ls / label / rm / prefetch: print JSON (for scripts).");
ABSL_FLAG(bool, progress, true, "push / pull: draw a progress bar when stderr is a terminal.");

namespace {

constexpr char kUsage[] =
    "the deltaserve command-line client.\n"
    "  deltactl [--server=HOST:PORT] health [liveness|readiness|SERVICE]   (exit 0 when SERVING)\n"
    "  deltactl [--server=HOST:PORT] info\n"
    "  deltactl [--server=HOST:PORT] embed [--task=T | --digest=sha256:...] [--tokens] [--ids]\n"
    "           [--truncation=truncate|error] [TEXT ...]\n"
    "  deltactl [--server=HOST:PORT] classify --task=T [--top_k=N] [--pairs] [TEXT ...]\n"
    "      (without TEXT, reads one text per line from stdin; --pairs: each is TEXT<TAB>PAIR)\n"
    "  deltactl push FILE --task=T [--label=L1,L2]   (the pack becomes T's next version)\n"
    "  deltactl pull REF [--output=FILE]             (REF: task, task@3, task:prod, sha256:<hex>, tenant/task)\n"
    "  deltactl show REF\n"
    "  deltactl ls [--task=T]\n"
    "  deltactl label TASK@VERSION LABEL\n"
    "  deltactl rm TASK@VERSION | TASK:LABEL\n"
    "  deltactl prefetch REF...                      (loads the tasks' packs into the server's cache)\n"
    "  deltactl tune submit --task=T --data=FILE [--method=lora,bitfit] [--method_config=JSON] [--label=prod]\n"
    "           [--watch]                            (fine-tunes a delta on the served model; see --helpfull)\n"
    "  deltactl tune watch JOB | get JOB | cancel JOB | ls [--state=running]\n"
    "  deltactl admin --tenants_file=F tenant add|rm|ls|quota ... | token create|revoke|ls ...\n"
    "           (edits the server's tenants file: tenants, quotas, API tokens; needs no server)\n"
    "  deltactl backup --out=DIR [--tenant=T | --tenants=A,B | --tenants_file=F | --all_tenants] [--overwrite]\n"
    "           (every version, label and pack of the tenants, through the API; any store backend)\n"
    "  deltactl restore DIR [--tenant=T] [--dry_run]   (checks every blob first; idempotent; prints JSON)\n"
    "  with authentication: --token=dst_... (or $DELTASERVE_TOKEN); with TLS: --tls_ca=CA.pem [--tls_cert --tls_key]\n"
    "  store commands and prefetch print text; add --json for scripts\n";

int Fail(const absl::Status& status) {
  std::cerr << "deltactl: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  return 1;
}

void Print(const nlohmann::json& j) { std::cout << (absl::GetFlag(FLAGS_pretty) ? j.dump(2) : j.dump()) << "\n"; }

// Exits 0 when SERVING: usable as an exec probe. `service` "" = the whole server; "liveness", "readiness" or a
// deltaserve.v1 service name.
int Health(deltaserve::client::DeltaserveClient& client, const std::string& service) {
  auto status = client.Health(service);
  if (!status.ok()) return Fail(status.status());
  Print(service.empty() ? nlohmann::json{{"status", *status}} : nlohmann::json{{"service", service}, {"status", *status}});
  return *status == "SERVING" ? 0 : 1;
}

int Info(deltaserve::client::DeltaserveClient& client) {
  auto info = client.GetModelInfo();
  if (!info.ok()) return Fail(info.status());
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(*info, &json, options);
  Print(nlohmann::json::parse(json));
  return 0;
}

// Texts from the arguments, or one per line from stdin.
std::vector<std::string> ReadTexts(std::vector<std::string> texts) {
  if (texts.empty()) {
    std::string line;
    while (std::getline(std::cin, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      texts.push_back(line);
    }
  }
  return texts;
}

// --task / --digest as a TaskRef; false when neither is set.
bool TaskFromFlags(deltaserve::v1::TaskRef* task) {
  const std::string name = absl::GetFlag(FLAGS_task);
  const std::string digest = absl::GetFlag(FLAGS_digest);
  if (name.empty() && digest.empty()) return false;
  task->set_task(name);
  if (!digest.empty()) task->set_digest(digest);
  return true;
}

nlohmann::json DeltaJson(const deltaserve::v1::DeltaInfo& delta) {
  return {{"digest", delta.digest()},
          {"name", delta.name()},
          {"methods", std::vector<std::string>(delta.methods().begin(), delta.methods().end())}};
}

int Classify(deltaserve::client::DeltaserveClient& client, std::vector<std::string> texts) {
  texts = ReadTexts(std::move(texts));
  if (texts.empty()) {
    std::cerr << "deltactl: classify: no texts (give them as arguments or on stdin, one per line)\n";
    return 2;
  }
  deltaserve::v1::ClassifyRequest request;
  request.set_tenant(absl::GetFlag(FLAGS_tenant));
  if (!TaskFromFlags(request.mutable_task())) {
    std::cerr << "deltactl: classify needs --task (or --digest)\n";
    return 2;
  }
  // --pairs: split each input at its first tab into the text and its pair.
  std::vector<std::string> pairs;
  if (absl::GetFlag(FLAGS_pairs)) {
    for (size_t i = 0; i < texts.size(); ++i) {
      const size_t tab = texts[i].find('\t');
      if (tab == std::string::npos) {
        std::cerr << "deltactl: classify --pairs: input " << i + 1 << " has no tab: give TEXT<TAB>PAIR\n";
        return 2;
      }
      pairs.push_back(texts[i].substr(tab + 1));
      texts[i].resize(tab);
    }
  }
  for (const std::string& text : texts) request.add_texts(text);
  for (const std::string& pair : pairs) request.add_text_pairs(pair);
  request.set_top_k(absl::GetFlag(FLAGS_top_k));
  auto response = client.Classify(request);
  if (!response.ok()) return Fail(response.status());
  nlohmann::json out = {{"model", response->model()}, {"delta", DeltaJson(response->delta())},
                        {"results", nlohmann::json::array()}};
  for (int i = 0; i < response->results_size(); ++i) {
    const auto& r = response->results(i);
    nlohmann::json item = {{"text", texts[i]}, {"num_tokens", r.num_tokens()}, {"truncated", r.truncated()}};
    if (!pairs.empty()) item["text_pair"] = pairs[i];
    if (r.labels_size() > 0) {
      nlohmann::json labels = nlohmann::json::array();
      for (const auto& l : r.labels()) labels.push_back({{"label", l.label()}, {"score", l.score()}});
      item["labels"] = std::move(labels);
    } else {
      item["value"] = r.value();
    }
    out["results"].push_back(std::move(item));
  }
  Print(out);
  return 0;
}

int Embed(deltaserve::client::DeltaserveClient& client, std::vector<std::string> texts) {
  texts = ReadTexts(std::move(texts));
  if (texts.empty()) {
    std::cerr << "deltactl: embed: no texts (give them as arguments or on stdin, one per line)\n";
    return 2;
  }
  deltaserve::v1::EmbedRequest request;
  request.set_tenant(absl::GetFlag(FLAGS_tenant));
  TaskFromFlags(request.mutable_task());
  for (const std::string& text : texts) request.add_texts(text);
  request.set_return_token_embeddings(absl::GetFlag(FLAGS_tokens));
  request.set_return_token_ids(absl::GetFlag(FLAGS_ids));
  const std::string truncation = absl::GetFlag(FLAGS_truncation);
  if (truncation == "truncate") {
    request.set_truncation(deltaserve::v1::TRUNCATION_TRUNCATE);
  } else if (truncation == "error") {
    request.set_truncation(deltaserve::v1::TRUNCATION_ERROR);
  } else if (!truncation.empty()) {
    std::cerr << "deltactl: --truncation must be 'truncate' or 'error'\n";
    return 2;
  }
  auto response = client.Embed(request);
  if (!response.ok()) return Fail(response.status());
  nlohmann::json out = {{"model", response->model()}, {"results", nlohmann::json::array()}};
  if (response->has_delta()) out["delta"] = DeltaJson(response->delta());
  for (int i = 0; i < response->results_size(); ++i) {
    const auto& r = response->results(i);
    nlohmann::json item = {{"text", texts[i]},
                           {"num_tokens", r.num_tokens()},
                           {"truncated", r.truncated()},
                           {"embedding", std::vector<float>(r.embedding().values().begin(),
                                                            r.embedding().values().end())}};
    if (r.token_ids_size() > 0) {
      item["token_ids"] = std::vector<int64_t>(r.token_ids().begin(), r.token_ids().end());
    }
    if (r.token_embeddings_size() > 0) {
      nlohmann::json tokens = nlohmann::json::array();
      for (const auto& v : r.token_embeddings()) tokens.push_back(std::vector<float>(v.values().begin(), v.values().end()));
      item["token_embeddings"] = std::move(tokens);
    }
    out["results"].push_back(std::move(item));
  }
  Print(out);
  return 0;
}

// --- The delta store ---

nlohmann::json VersionJson(const deltaserve::v1::DeltaVersion& v) {
  return {{"tenant", v.tenant()},
          {"task", v.task()},
          {"version", v.version()},
          {"digest", v.digest()},
          {"size_bytes", v.size_bytes()},
          {"created", absl::FormatTime(absl::RFC3339_sec, absl::FromUnixMicros(v.created_unix_micros()),
                                       absl::UTCTimeZone())},
          {"labels", std::vector<std::string>(v.labels().begin(), v.labels().end())}};
}

nlohmann::json PackJson(const deltaserve::v1::DeltaPackSummary& p) {
  nlohmann::json j = {{"name", p.name()},
                      {"methods", std::vector<std::string>(p.methods().begin(), p.methods().end())},
                      {"backbone_fingerprint", p.backbone_fingerprint()}};
  if (!p.head_kind().empty()) {
    j["head"] = {{"kind", p.head_kind()},
                 {"labels", std::vector<std::string>(p.head_labels().begin(), p.head_labels().end())}};
  }
  return j;
}

std::string HumanBytes(int64_t n) {
  if (n < 1024) return absl::StrCat(n, " B");
  if (n < (1 << 20)) return absl::StrFormat("%.1f KiB", n / 1024.0);
  return absl::StrFormat("%.1f MiB", n / 1048576.0);
}

// "tenant/task@3" for people.
std::string VersionName(const deltaserve::v1::DeltaVersion& v) {
  return absl::StrCat(v.tenant(), "/", v.task(), "@", v.version());
}

// A progress bar on stderr, drawn only when stderr is a terminal.
deltaserve::client::DeltaserveClient::Progress ProgressBar(const std::string& what) {
  if (!absl::GetFlag(FLAGS_progress) || !::isatty(2)) return nullptr;
  return [what, start = absl::Now()](int64_t done, int64_t total) {
    const double fraction = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    const int width = 30, filled = static_cast<int>(fraction * width);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    std::fprintf(stderr, "\r%s [%s%s] %3.0f%% %s  %.1f MiB/s", what.c_str(), std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), fraction * 100, HumanBytes(done).c_str(),
                 seconds > 0 ? done / 1048576.0 / seconds : 0.0);
    if (done >= total) std::fprintf(stderr, "\n");
  };
}

// "[tenant/]task@N" or "[tenant/]task:label" split into tenant, task and the selector; false when malformed.
bool SplitTaskRef(const std::string& ref, std::string* tenant, std::string* task, int64_t* version,
                  std::string* label) {
  std::string rest = ref;
  if (const size_t slash = rest.find('/'); slash != std::string::npos) {
    *tenant = rest.substr(0, slash);
    rest = rest.substr(slash + 1);
  }
  if (const size_t at = rest.find('@'); at != std::string::npos) {
    *task = rest.substr(0, at);
    return absl::SimpleAtoi(rest.substr(at + 1), version) && *version > 0 && !task->empty();
  }
  if (const size_t colon = rest.find(':'); colon != std::string::npos) {
    *task = rest.substr(0, colon);
    *label = rest.substr(colon + 1);
    return !task->empty() && !label->empty();
  }
  return false;
}

int Push(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1 || absl::GetFlag(FLAGS_task).empty()) {
    std::cerr << "deltactl: push FILE --task=T [--label=L1,L2]\n";
    return 2;
  }
  std::ifstream in(args[0], std::ios::binary);
  if (!in) return Fail(absl::NotFoundError(absl::StrCat("cannot read ", args[0])));
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string bytes = buffer.str();
  deltaserve::v1::PushDeltaHeader header;
  header.set_tenant(absl::GetFlag(FLAGS_tenant));
  header.set_task(absl::GetFlag(FLAGS_task));
  for (const std::string& label : absl::GetFlag(FLAGS_label)) header.add_labels(label);
  auto response = client.PushDelta(header, bytes, ProgressBar("push " + args[0]));
  if (!response.ok()) return Fail(response.status());
  if (absl::GetFlag(FLAGS_json)) {
    Print({{"version", VersionJson(response->version())},
           {"created", response->created()},
           {"uploaded_digest", response->uploaded_digest()},
           {"pack", PackJson(response->pack())}});
    return 0;
  }
  const auto& v = response->version();
  std::cout << (response->created() ? "pushed " : "already stored as ") << VersionName(v) << "  " << v.digest()
            << "  " << HumanBytes(v.size_bytes()) << "  " << absl::StrJoin(response->pack().methods(), "+")
            << "  labels: " << absl::StrJoin(v.labels(), ", ") << "\n";
  return 0;
}

int Pull(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::cerr << "deltactl: pull REF [--output=FILE]\n";
    return 2;
  }
  std::string bytes;
  auto version = client.PullDelta(absl::GetFlag(FLAGS_tenant), args[0], &bytes, ProgressBar("pull " + args[0]));
  if (!version.ok()) return Fail(version.status());
  std::string output = absl::GetFlag(FLAGS_output);
  if (output.empty()) {
    output = version->task().empty() ? absl::StrCat(version->digest().substr(7, 12), ".dpack")
                                     : absl::StrCat(version->task(), ".v", version->version(), ".dpack");
  }
  if (output == "-") {
    std::cout.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return 0;
  }
  std::ofstream out(output, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return Fail(absl::InternalError(absl::StrCat("cannot write ", output)));
  if (absl::GetFlag(FLAGS_json)) {
    Print({{"version", VersionJson(*version)}, {"file", output}});
  } else {
    std::cout << "pulled " << VersionName(*version) << "  " << version->digest() << " -> " << output << "\n";
  }
  return 0;
}

int Show(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::cerr << "deltactl: show REF\n";
    return 2;
  }
  auto response = client.GetDelta(absl::GetFlag(FLAGS_tenant), args[0]);
  if (!response.ok()) return Fail(response.status());
  const nlohmann::json j = {{"version", VersionJson(response->version())}, {"pack", PackJson(response->pack())}};
  std::cout << (absl::GetFlag(FLAGS_json) && !absl::GetFlag(FLAGS_pretty) ? j.dump() : j.dump(2)) << "\n";
  return 0;
}

int List(deltaserve::client::DeltaserveClient& client) {
  deltaserve::v1::ListDeltasRequest request;
  request.set_tenant(absl::GetFlag(FLAGS_tenant));
  request.set_task(absl::GetFlag(FLAGS_task));
  request.set_page_size(1000);
  std::vector<deltaserve::v1::DeltaVersion> versions;
  do {
    auto page = client.ListDeltas(request);
    if (!page.ok()) return Fail(page.status());
    versions.insert(versions.end(), page->versions().begin(), page->versions().end());
    request.set_page_token(page->next_page_token());
  } while (!request.page_token().empty());
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& v : versions) out.push_back(VersionJson(v));
    Print(out);
    return 0;
  }
  std::printf("%-24s %7s  %-19s  %10s  %-20s  %s\n", "TASK", "VERSION", "DIGEST", "SIZE", "CREATED", "LABELS");
  for (const auto& v : versions) {
    std::printf("%-24s %7lld  %-19s  %10s  %-20s  %s\n", v.task().c_str(), static_cast<long long>(v.version()),
                v.digest().substr(0, 19).c_str(), HumanBytes(v.size_bytes()).c_str(),
                absl::FormatTime("%Y-%m-%d %H:%M:%S", absl::FromUnixMicros(v.created_unix_micros()),
                                 absl::UTCTimeZone())
                    .c_str(),
                absl::StrJoin(v.labels(), ",").c_str());
  }
  return 0;
}

int Label(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  std::string tenant = absl::GetFlag(FLAGS_tenant), task, label;
  int64_t version = 0;
  if (args.size() != 2 || !SplitTaskRef(args[0], &tenant, &task, &version, &label) || version == 0) {
    std::cerr << "deltactl: label TASK@VERSION LABEL\n";
    return 2;
  }
  deltaserve::v1::SetLabelRequest request;
  request.set_tenant(tenant);
  request.set_task(task);
  request.set_version(version);
  request.set_label(args[1]);
  auto response = client.SetLabel(request);
  if (!response.ok()) return Fail(response.status());
  if (absl::GetFlag(FLAGS_json)) {
    Print({{"version", VersionJson(response->version())}});
  } else {
    std::cout << args[1] << " -> " << VersionName(response->version()) << "\n";
  }
  return 0;
}

int Remove(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  std::string tenant = absl::GetFlag(FLAGS_tenant), task, label;
  int64_t version = 0;
  if (args.size() != 1 || !SplitTaskRef(args[0], &tenant, &task, &version, &label)) {
    std::cerr << "deltactl: rm TASK@VERSION | TASK:LABEL\n";
    return 2;
  }
  absl::Status status;
  if (version > 0) {
    deltaserve::v1::DeleteVersionRequest request;
    request.set_tenant(tenant);
    request.set_task(task);
    request.set_version(version);
    status = client.DeleteVersion(request);
  } else {
    deltaserve::v1::DeleteLabelRequest request;
    request.set_tenant(tenant);
    request.set_task(task);
    request.set_label(label);
    status = client.DeleteLabel(request);
  }
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    Print({{"deleted", args[0]}});
  } else {
    std::cout << "deleted " << args[0] << "\n";
  }
  return 0;
}

const char* TierName(deltaserve::v1::CacheTier tier) {
  switch (tier) {
    case deltaserve::v1::CACHE_TIER_DEVICE:
      return "device";
    case deltaserve::v1::CACHE_TIER_HOST:
      return "host";
    case deltaserve::v1::CACHE_TIER_STORE:
      return "store";
    default:
      return "unknown";
  }
}

int Prefetch(deltaserve::client::DeltaserveClient& client, const std::vector<std::string>& args) {
  if (args.empty()) {
    std::cerr << "deltactl: prefetch REF... (REF: task, task@3, task:prod, sha256:<hex>, tenant/task...)\n";
    return 2;
  }
  deltaserve::v1::PrefetchRequest request;
  request.set_tenant(absl::GetFlag(FLAGS_tenant));
  for (const std::string& ref : args) request.add_tasks()->set_task(ref);
  auto response = client.Prefetch(request);
  if (!response.ok()) return Fail(response.status());
  nlohmann::json out = nlohmann::json::array();
  for (int i = 0; i < response->deltas_size(); ++i) {
    const deltaserve::v1::PrefetchedDelta& d = response->deltas(i);
    const std::string name =
        d.task().empty() ? d.digest() : absl::StrCat(d.tenant(), "/", d.task(), "@", d.version());
    if (absl::GetFlag(FLAGS_json)) {
      out.push_back({{"ref", args[i]},
                     {"tenant", d.tenant()},
                     {"task", d.task()},
                     {"version", d.version()},
                     {"digest", d.digest()},
                     {"source", TierName(d.source())},
                     {"device_bytes", d.device_bytes()},
                     {"serialized_bytes", d.serialized_bytes()},
                     {"load_seconds", d.load_seconds()},
                     {"resident", d.resident()}});
    } else if (d.source() == deltaserve::v1::CACHE_TIER_DEVICE) {
      std::cout << name << ": already loaded (" << HumanBytes(d.device_bytes()) << " on the device)"
                << (d.resident() ? "" : ", but not kept: over the server's cache budget") << "\n";
    } else {
      std::cout << name << ": loaded from the " << TierName(d.source()) << " in "
                << absl::StrFormat("%.3f", d.load_seconds()) << " s (" << HumanBytes(d.device_bytes())
                << " on the device)" << (d.resident() ? "" : ", but not kept: over the server's cache budget")
                << "\n";
    }
  }
  if (absl::GetFlag(FLAGS_json)) Print(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << kUsage;
    return 2;
  }
  // admin edits the tenants file locally: no server, no channel.
  if (std::string(args[1]) == "admin") {
    return deltaserve::client::AdminCommand(std::vector<std::string>(args.begin() + 2, args.end()));
  }
  deltaserve::client::DeltaserveClient::Options options;
  options.target = absl::GetFlag(FLAGS_server);
  options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_s));
  options.token = absl::GetFlag(FLAGS_token);
  if (options.token.empty()) {
    if (const char* env = std::getenv("DELTASERVE_TOKEN"); env != nullptr) options.token = env;
  }
  options.tls = absl::GetFlag(FLAGS_tls);
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  absl::StatusOr<std::unique_ptr<deltaserve::client::DeltaserveClient>> created =
      deltaserve::client::DeltaserveClient::Create(options);
  if (!created.ok()) {
    std::cerr << "deltactl: " << created.status().message() << "\n";
    return 2;
  }
  deltaserve::client::DeltaserveClient& client = **created;
  const std::string command = args[1];
  if (command == "health") return Health(client, args.size() > 2 ? args[2] : "");
  if (command == "info") return Info(client);
  if (command == "embed") return Embed(client, std::vector<std::string>(args.begin() + 2, args.end()));
  const std::vector<std::string> rest(args.begin() + 2, args.end());
  if (command == "classify") return Classify(client, rest);
  if (command == "push") return Push(client, rest);
  if (command == "pull") return Pull(client, rest);
  if (command == "show") return Show(client, rest);
  if (command == "ls") return List(client);
  if (command == "label") return Label(client, rest);
  if (command == "rm") return Remove(client, rest);
  if (command == "prefetch") return Prefetch(client, rest);
  if (command == "backup" || command == "restore") {
    deltaserve::client::BackupContext ctx;
    ctx.server = absl::GetFlag(FLAGS_server);
    ctx.tenant = absl::GetFlag(FLAGS_tenant);
    ctx.print = Print;
    return command == "backup" ? deltaserve::client::BackupCommand(client, ctx, rest)
                               : deltaserve::client::RestoreCommand(client, ctx, rest);
  }
  if (command == "tune") {
    deltaserve::client::TuneContext ctx;
    ctx.tenant = absl::GetFlag(FLAGS_tenant);
    ctx.task = absl::GetFlag(FLAGS_task);
    ctx.labels = absl::GetFlag(FLAGS_label);
    ctx.json = absl::GetFlag(FLAGS_json);
    ctx.print = Print;
    return deltaserve::client::TuneCommand(client, ctx, rest);
  }
  std::cerr << "deltactl: unknown command '" << command << "'\n" << kUsage;
  return 2;
}
