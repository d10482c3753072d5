// deltactl: the command-line client of deltaserve.
//
//   deltactl [--server=HOST:PORT] health
//   deltactl [--server=HOST:PORT] info
//   deltactl [--server=HOST:PORT] embed [--task=T | --digest=sha256:...] [--tokens] [--ids]
//            [--truncation=truncate|error] [TEXT ...]
//   deltactl [--server=HOST:PORT] classify --task=T [--top_k=N] [TEXT ...]
//       (no TEXT: one text per line from stdin)
//
// Output is JSON on stdout; errors go to stderr as "deltactl: CODE: message" with exit code 1 (2 for usage).
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "deltaserve address (host:port).");
ABSL_FLAG(double, timeout_s, 30, "Deadline of each call, in seconds.");
ABSL_FLAG(std::string, tenant, "", "Tenant to send with requests (optional without authentication).");
ABSL_FLAG(bool, tokens, false, "embed: also print per-token embeddings.");
ABSL_FLAG(bool, ids, false, "embed: also print the token ids.");
ABSL_FLAG(std::string, truncation, "", "embed: 'truncate' or 'error' for over-long inputs (default: server's).");
ABSL_FLAG(bool, pretty, false, "Indent the JSON output.");
ABSL_FLAG(std::string, task, "", "embed / classify: the task (delta pack) to run with; empty = the base model.");
ABSL_FLAG(std::string, digest, "", "embed / classify: the delta pack by content digest (sha256:<hex>).");
ABSL_FLAG(int, top_k, 0, "classify: labels per input, best first (0 = all).");

namespace {

constexpr char kUsage[] =
    "the deltaserve command-line client.\n"
    "  deltactl [--server=HOST:PORT] health\n"
    "  deltactl [--server=HOST:PORT] info\n"
    "  deltactl [--server=HOST:PORT] embed [--task=T | --digest=sha256:...] [--tokens] [--ids]\n"
    "           [--truncation=truncate|error] [TEXT ...]\n"
    "  deltactl [--server=HOST:PORT] classify --task=T [--top_k=N] [TEXT ...]\n"
    "      (without TEXT, reads one text per line from stdin)\n";

int Fail(const absl::Status& status) {
  std::cerr << "deltactl: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  return 1;
}

void Print(const nlohmann::json& j) { std::cout << (absl::GetFlag(FLAGS_pretty) ? j.dump(2) : j.dump()) << "\n"; }

int Health(deltaserve::client::DeltaserveClient& client) {
  auto status = client.Health();
  if (!status.ok()) return Fail(status.status());
  Print({{"status", *status}});
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
  for (const std::string& text : texts) request.add_texts(text);
  request.set_top_k(absl::GetFlag(FLAGS_top_k));
  auto response = client.Classify(request);
  if (!response.ok()) return Fail(response.status());
  nlohmann::json out = {{"model", response->model()}, {"delta", DeltaJson(response->delta())},
                        {"results", nlohmann::json::array()}};
  for (int i = 0; i < response->results_size(); ++i) {
    const auto& r = response->results(i);
    nlohmann::json item = {{"text", texts[i]}, {"num_tokens", r.num_tokens()}, {"truncated", r.truncated()}};
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

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << kUsage;
    return 2;
  }
  deltaserve::client::DeltaserveClient::Options options;
  options.target = absl::GetFlag(FLAGS_server);
  options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_s));
  deltaserve::client::DeltaserveClient client(options);
  const std::string command = args[1];
  if (command == "health") return Health(client);
  if (command == "info") return Info(client);
  if (command == "embed") return Embed(client, std::vector<std::string>(args.begin() + 2, args.end()));
  if (command == "classify") return Classify(client, std::vector<std::string>(args.begin() + 2, args.end()));
  std::cerr << "deltactl: unknown command '" << command << "'\n" << kUsage;
  return 2;
}
