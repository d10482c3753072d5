// deltactl tune: fine-tuning jobs (deltaserve.v1.TuningService) from the command line.
//
//   deltactl tune submit --task=T --data=FILE [--method=lora,bitfit] [--method_config=JSON] [--label=prod] [--watch]
//   deltactl tune watch JOB
//   deltactl tune get JOB
//   deltactl tune ls [--state=running]
//   deltactl tune cancel JOB
#include "client/deltactl_tune.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, data, "", "tune submit: the training dataset (TSV, CSV or JSONL with text[, text_pair], label).");
ABSL_FLAG(std::string, validation_data, "",
          "tune submit: a validation dataset (default: --validation_fraction of --data, stratified).");
ABSL_FLAG(double, validation_fraction, 0.1, "tune submit: the share of --data held out for validation.");
ABSL_FLAG(std::string, format, "auto", "tune submit: dataset format: auto, tsv, csv, jsonl.");
ABSL_FLAG(bool, no_header, false, "tune submit: TSV / CSV without a header line (columns are then 0, 1, ...).");
ABSL_FLAG(std::string, text_column, "", "tune submit: the text column (default text, sentence or sentence1).");
ABSL_FLAG(std::string, text_pair_column, "", "tune submit: the second text of pair tasks (default text_pair / sentence2).");
ABSL_FLAG(std::string, label_column, "", "tune submit: the label column (default label).");
ABSL_FLAG(std::vector<std::string>, method, {},
          "tune submit: delta methods to train, comma separated (lora, adapter, parallel_adapter, prefix, prompt, "
          "bitfit, ln_tuning, ia3); none = the head alone.");
ABSL_FLAG(std::string, method_config, "",
          "tune submit: hyper-parameters per method as JSON, e.g. '{\"lora\": {\"rank\": 8, \"alpha\": 16}}'.");
ABSL_FLAG(bool, full, false, "tune submit: full fine-tuning (baseline; the server must allow it).");
ABSL_FLAG(std::string, task_type, "classification", "tune submit: classification or regression.");
ABSL_FLAG(std::vector<std::string>, classes, {}, "tune submit: the classes in head order (default: from the data).");
ABSL_FLAG(int64_t, head_hidden, 0, "tune submit: width of a dense layer in the head (0 = linear head).");
ABSL_FLAG(double, lr, 0, "tune submit: peak learning rate (0 = the server's default, 1e-3).");
ABSL_FLAG(double, head_lr, 0,
          "tune submit: the head's peak learning rate (0 = --lr); a head often wants more (1e-2) than a LoRA or an "
          "adapter.");
ABSL_FLAG(int64_t, epochs, 0, "tune submit: epochs (0 = default 3).");
ABSL_FLAG(int64_t, max_steps, 0, "tune submit: stop after this many steps (0 = the epochs decide).");
ABSL_FLAG(int64_t, batch_size, 0, "tune submit: examples per step (0 = default 32).");
ABSL_FLAG(double, warmup_fraction, -1, "tune submit: warm-up share of the steps (-1 = default 0.06).");
ABSL_FLAG(double, weight_decay, -1, "tune submit: AdamW weight decay (-1 = default 0.01).");
ABSL_FLAG(int64_t, max_seq_len, 0, "tune submit: longest input in tokens (0 = default 128).");
ABSL_FLAG(int64_t, seed, -1, "tune submit: random seed (-1 = default 42).");
ABSL_FLAG(std::string, description, "",
          "tune submit: free text kept in the pack's provenance; admin token create: what the token is for.");
ABSL_FLAG(std::string, request_id, "", "tune submit: idempotency key (a retry returns the same job).");
ABSL_FLAG(bool, watch, false, "tune submit: watch the job until it finishes.");
ABSL_FLAG(std::string, state, "", "tune ls: only jobs in this state (queued, running, succeeded, failed, cancelled).");

namespace deltaserve {
namespace client {
namespace {

namespace pb = ::deltaserve::v1;

int TuneFail(const absl::Status& status) {
  std::cerr << "deltactl: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  return 1;
}

std::string StateName(pb::JobState state) {
  std::string name = pb::JobState_Name(state);
  if (absl::StartsWith(name, "JOB_STATE_")) name = name.substr(10);
  return absl::AsciiStrToLower(name);
}

std::string Duration(double seconds) {
  if (!(seconds >= 0) || std::isinf(seconds)) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
}

nlohmann::json JobJson(const pb::Job& job) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(job, &text, options);
  return nlohmann::json::parse(text, nullptr, false);
}

std::string EvalText(const pb::EvalResult& eval) {
  std::vector<std::string> parts;
  for (const char* name : {"accuracy", "macro_f1", "f1", "mcc", "mse", "pearson", "spearman"}) {
    auto it = eval.metrics().find(name);
    if (it != eval.metrics().end()) parts.push_back(absl::StrFormat("%s %.4f", name, it->second));
  }
  return absl::StrCat("epoch ", eval.epoch(), ": val loss ", absl::StrFormat("%.4f", eval.loss()), ", ",
                      absl::StrJoin(parts, ", "));
}

void PrintJobSummary(const pb::Job& job) {
  std::cout << job.id() << "  " << StateName(job.state()) << "  " << job.tenant() << "/" << job.spec().task();
  std::vector<std::string> methods;
  for (const auto& m : job.spec().methods()) methods.push_back(m.method());
  if (job.spec().full()) methods.push_back("full");
  if (methods.empty()) methods.push_back("head");
  std::cout << "  " << absl::StrJoin(methods, "+");
  if (job.progress().total_steps() > 0) {
    std::cout << "  step " << job.progress().step() << "/" << job.progress().total_steps();
  }
  if (!job.evals().empty()) {
    const pb::EvalResult& best = job.evals(static_cast<int>(
        std::max<int64_t>(0, std::min<int64_t>(job.best_epoch() > 0 ? job.best_epoch() - 1 : job.evals_size() - 1,
                                               job.evals_size() - 1))));
    auto it = best.metrics().find(best.primary_metric());
    if (it != best.metrics().end()) std::cout << "  " << best.primary_metric() << " " << absl::StrFormat("%.4f", it->second);
  }
  if (job.has_result() && job.result().version() > 0) {
    std::cout << "  -> " << job.result().tenant() << "/" << job.result().task() << "@" << job.result().version();
  }
  if (!job.error().empty()) std::cout << "  error: " << job.error();
  std::cout << "\n";
}

// Draws the job's progress; on a terminal one line rewritten in place, else a line per epoch and state change.
class ProgressPrinter {
 public:
  ProgressPrinter() : tty_(::isatty(2) != 0) {}
  void Update(const pb::Job& job) {
    if (job.evals_size() > evals_shown_) {
      if (tty_) std::fprintf(stderr, "\r\033[K");
      for (int i = evals_shown_; i < job.evals_size(); ++i) std::fprintf(stderr, "%s\n", EvalText(job.evals(i)).c_str());
      evals_shown_ = job.evals_size();
    }
    if (job.state() != last_state_) {
      if (tty_) std::fprintf(stderr, "\r\033[K");
      std::fprintf(stderr, "%s: %s\n", job.id().c_str(), StateName(job.state()).c_str());
      last_state_ = job.state();
    }
    const pb::JobProgress& p = job.progress();
    if (tty_ && job.state() == pb::JOB_STATE_RUNNING && p.total_steps() > 0) {
      const double fraction = static_cast<double>(p.step()) / static_cast<double>(p.total_steps());
      const int width = 24, filled = static_cast<int>(fraction * width);
      std::fprintf(stderr, "\r\033[K[%s%s] %3.0f%% step %lld/%lld epoch %lld/%lld loss %.4f lr %.2e %.0f ex/s eta %s",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), fraction * 100,
                   static_cast<long long>(p.step()), static_cast<long long>(p.total_steps()),
                   static_cast<long long>(p.epoch()), static_cast<long long>(p.epochs()), p.loss(), p.learning_rate(),
                   p.examples_per_second(), Duration(p.eta_seconds()).c_str());
      std::fflush(stderr);
    }
  }

 private:
  const bool tty_;
  int evals_shown_ = 0;
  pb::JobState last_state_ = pb::JOB_STATE_UNSPECIFIED;
};

int Watch(DeltaserveClient& client, const TuneContext& ctx, const std::string& id) {
  ProgressPrinter printer;
  absl::StatusOr<pb::Job> job = client.WatchJob(ctx.tenant, id, [&](const pb::Job& j) {
    if (!ctx.json) printer.Update(j);
    return true;
  });
  if (!job.ok()) return TuneFail(job.status());
  if (ctx.json) {
    ctx.print(JobJson(*job));
  } else {
    PrintJobSummary(*job);
  }
  return job->state() == pb::JOB_STATE_SUCCEEDED ? 0 : 1;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void FillDataset(const std::string& digest, pb::DatasetSpec* spec) {
  spec->set_digest(digest);
  spec->set_format(absl::GetFlag(FLAGS_format));
  spec->set_no_header(absl::GetFlag(FLAGS_no_header));
  spec->set_text_column(absl::GetFlag(FLAGS_text_column));
  spec->set_text_pair_column(absl::GetFlag(FLAGS_text_pair_column));
  spec->set_label_column(absl::GetFlag(FLAGS_label_column));
}

int Submit(DeltaserveClient& client, const TuneContext& ctx) {
  if (ctx.task.empty() || absl::GetFlag(FLAGS_data).empty()) {
    std::cerr << "deltactl: tune submit --task=T --data=FILE [--method=lora] [--method_config=JSON] [--label=prod] "
                 "[--watch]\n";
    return 2;
  }
  pb::SubmitJobRequest request;
  request.set_tenant(ctx.tenant);
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  pb::JobSpec* spec = request.mutable_spec();
  spec->set_task(ctx.task);
  spec->set_full(absl::GetFlag(FLAGS_full));
  spec->set_description(absl::GetFlag(FLAGS_description));
  for (const std::string& label : ctx.labels) spec->add_labels(label);

  nlohmann::json configs = nlohmann::json::object();
  if (const std::string text = absl::GetFlag(FLAGS_method_config); !text.empty()) {
    configs = nlohmann::json::parse(text, nullptr, false);
    if (configs.is_discarded() || !configs.is_object()) {
      return TuneFail(absl::InvalidArgumentError(
          "--method_config must be a JSON object keyed by method, e.g. '{\"lora\": {\"rank\": 8}}'"));
    }
  }
  for (const std::string& method : absl::GetFlag(FLAGS_method)) {
    pb::MethodConfig* m = spec->add_methods();
    m->set_method(method);
    if (configs.contains(method)) m->set_config_json(configs[method].dump());
  }
  for (const auto& [method, config] : configs.items()) {
    const auto& listed = absl::GetFlag(FLAGS_method);
    if (std::find(listed.begin(), listed.end(), method) == listed.end()) {
      return TuneFail(absl::InvalidArgumentError(
          absl::StrCat("--method_config has settings for \"", method, "\", which --method does not list")));
    }
  }
  pb::HeadConfig* head = spec->mutable_head();
  head->set_type(absl::GetFlag(FLAGS_task_type));
  for (const std::string& c : absl::GetFlag(FLAGS_classes)) head->add_labels(c);
  head->set_hidden(absl::GetFlag(FLAGS_head_hidden));

  pb::HyperParameters* hp = spec->mutable_hyper_parameters();
  if (absl::GetFlag(FLAGS_lr) != 0) hp->set_learning_rate(absl::GetFlag(FLAGS_lr));
  if (absl::GetFlag(FLAGS_head_lr) != 0) hp->set_head_learning_rate(absl::GetFlag(FLAGS_head_lr));
  if (absl::GetFlag(FLAGS_epochs) != 0) hp->set_epochs(absl::GetFlag(FLAGS_epochs));
  if (absl::GetFlag(FLAGS_max_steps) != 0) hp->set_max_steps(absl::GetFlag(FLAGS_max_steps));
  if (absl::GetFlag(FLAGS_batch_size) != 0) hp->set_batch_size(absl::GetFlag(FLAGS_batch_size));
  if (absl::GetFlag(FLAGS_warmup_fraction) != -1) hp->set_warmup_fraction(absl::GetFlag(FLAGS_warmup_fraction));
  if (absl::GetFlag(FLAGS_weight_decay) != -1) hp->set_weight_decay(absl::GetFlag(FLAGS_weight_decay));
  if (absl::GetFlag(FLAGS_max_seq_len) != 0) hp->set_max_sequence_length(absl::GetFlag(FLAGS_max_seq_len));
  if (absl::GetFlag(FLAGS_seed) != -1) hp->set_seed(static_cast<uint64_t>(absl::GetFlag(FLAGS_seed)));

  auto upload = [&](const std::string& path) -> absl::StatusOr<std::string> {
    absl::StatusOr<std::string> bytes = ReadFile(path);
    if (!bytes.ok()) return bytes.status();
    absl::StatusOr<pb::UploadDatasetResponse> uploaded = client.UploadDataset(ctx.tenant, *bytes);
    if (!uploaded.ok()) return uploaded.status();
    if (!ctx.json) std::cerr << "uploaded " << path << " (" << bytes->size() << " bytes) as " << uploaded->digest() << "\n";
    return uploaded->digest();
  };
  absl::StatusOr<std::string> train = upload(absl::GetFlag(FLAGS_data));
  if (!train.ok()) return TuneFail(train.status());
  FillDataset(*train, spec->mutable_train());
  if (const std::string path = absl::GetFlag(FLAGS_validation_data); !path.empty()) {
    absl::StatusOr<std::string> validation = upload(path);
    if (!validation.ok()) return TuneFail(validation.status());
    FillDataset(*validation, spec->mutable_validation_dataset());
  } else {
    spec->set_validation_fraction(absl::GetFlag(FLAGS_validation_fraction));
  }
  absl::StatusOr<pb::SubmitJobResponse> response = client.SubmitJob(request);
  if (!response.ok()) return TuneFail(response.status());
  const pb::Job& job = response->job();
  if (absl::GetFlag(FLAGS_watch)) {
    if (!ctx.json) {
      std::cerr << (response->created() ? "submitted " : "already submitted as ") << job.id() << " ("
                << job.train_examples() << " training / " << job.validation_examples() << " validation examples, "
                << job.trainable_parameters() << " trainable parameters)\n";
    }
    return Watch(client, ctx, job.id());
  }
  if (ctx.json) {
    ctx.print({{"job", JobJson(job)}, {"created", response->created()}});
  } else {
    std::cout << job.id() << "\n";
  }
  return 0;
}

int Get(DeltaserveClient& client, const TuneContext& ctx, const std::string& id) {
  absl::StatusOr<pb::Job> job = client.GetJob(ctx.tenant, id);
  if (!job.ok()) return TuneFail(job.status());
  if (ctx.json) {
    ctx.print(JobJson(*job));
    return 0;
  }
  PrintJobSummary(*job);
  for (const pb::EvalResult& eval : job->evals()) std::cout << "  " << EvalText(eval) << "\n";
  return 0;
}

int List(DeltaserveClient& client, const TuneContext& ctx) {
  pb::ListJobsRequest request;
  request.set_tenant(ctx.tenant);
  if (const std::string state = absl::GetFlag(FLAGS_state); !state.empty()) {
    pb::JobState parsed;
    if (!pb::JobState_Parse(absl::StrCat("JOB_STATE_", absl::AsciiStrToUpper(state)), &parsed)) {
      return TuneFail(absl::InvalidArgumentError(
          absl::StrCat("--state=", state, ": use queued, running, succeeded, failed or cancelled")));
    }
    request.set_state(parsed);
  }
  nlohmann::json all = nlohmann::json::array();
  while (true) {
    absl::StatusOr<pb::ListJobsResponse> page = client.ListJobs(request);
    if (!page.ok()) return TuneFail(page.status());
    for (const pb::Job& job : page->jobs()) {
      if (ctx.json) {
        all.push_back(JobJson(job));
      } else {
        PrintJobSummary(job);
      }
    }
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  if (ctx.json) ctx.print(all);
  return 0;
}

int Cancel(DeltaserveClient& client, const TuneContext& ctx, const std::string& id) {
  absl::StatusOr<pb::Job> job = client.CancelJob(ctx.tenant, id);
  if (!job.ok()) return TuneFail(job.status());
  if (ctx.json) {
    ctx.print(JobJson(*job));
  } else {
    std::cout << id << ": " << (job->state() == pb::JOB_STATE_CANCELLED ? "cancelled" : "cancelling") << "\n";
  }
  return 0;
}

}  // namespace

int TuneCommand(DeltaserveClient& client, const TuneContext& ctx, const std::vector<std::string>& args) {
  const char* usage =
      "deltactl tune submit --task=T --data=FILE [--method=M1,M2] [--method_config=JSON] [--label=prod] [--watch]\n"
      "deltactl tune watch JOB | get JOB | cancel JOB | ls [--state=S]\n";
  if (args.empty()) {
    std::cerr << usage;
    return 2;
  }
  const std::string& sub = args[0];
  if (sub == "submit" && args.size() == 1) return Submit(client, ctx);
  if (sub == "ls" && args.size() == 1) return List(client, ctx);
  if (args.size() == 2) {
    if (sub == "watch") return Watch(client, ctx, args[1]);
    if (sub == "get" || sub == "show") return Get(client, ctx, args[1]);
    if (sub == "cancel") return Cancel(client, ctx, args[1]);
  }
  std::cerr << usage;
  return 2;
}

}  // namespace client
}  // namespace deltaserve
