#include "server/inference/inference_engine.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/serving_activity.h"
#include "server/common/logging.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/batching/batch_plan.h"
#include "server/delta/delta_batch.h"
#include "server/delta/merge.h"
#include "server/model/tokenizer.h"

namespace deltaserve {
namespace inference {

InferenceEngine::InferenceEngine(std::shared_ptr<const model::Model> model, const Options& options,
                                 batching::BatcherObserver* observer, const DeltaResolver* resolver)
    : model_(std::move(model)),
      options_(options),
      resolver_(resolver),
      max_sequence_length_(options.max_sequence_length > 0
                               ? std::min(options.max_sequence_length, model_->info().max_sequence_length)
                               : model_->info().max_sequence_length) {
  batcher_ = std::make_unique<batching::Batcher>(
      options_.batching, [this](absl::Span<const batching::BatchRow> rows) { return RunBatch(rows); }, observer);
}

InferenceEngine::~InferenceEngine() { Stop(); }

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Create(
    std::shared_ptr<const model::Model> model, const Options& options, batching::BatcherObserver* observer,
    const DeltaResolver* resolver) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  if (options.max_inputs_per_request < 1) {
    return absl::InvalidArgumentError("max_inputs_per_request must be at least 1");
  }
  DS_RETURN_IF_ERROR(batching::Batcher::ValidateOptions(options.batching));
  const int64_t specials = model->tokenizer().NumSpecialTokens();
  if (options.max_sequence_length != 0 && options.max_sequence_length <= specials) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sequence_length must exceed the model's ", specials, " special tokens"));
  }
  return std::unique_ptr<InferenceEngine>(new InferenceEngine(std::move(model), options, observer, resolver));
}

void InferenceEngine::Stop() {
  if (batcher_) batcher_->Stop();
}

absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> InferenceEngine::ResolveTask(
    const std::string& tenant, const TaskSelector& task) const {
  if (task.empty()) return std::shared_ptr<const delta::DeltaPack>();
  if (resolver_ == nullptr) {
    return absl::FailedPreconditionError(
        "this engine serves no deltas (it has no delta store): leave `task` unset to use the base model");
  }
  return resolver_->Resolve(tenant, task);
}

absl::StatusOr<InferenceEngine::PreparedRows> InferenceEngine::PrepareRows(
    const std::vector<std::string>& texts, const std::vector<std::vector<int64_t>>& token_ids,
    const std::vector<std::string>& text_pairs, Truncation truncation) const {
  const bool has_texts = !texts.empty();
  const bool has_ids = !token_ids.empty();
  const bool has_pairs = !text_pairs.empty();
  if (has_texts && has_ids) {
    return absl::InvalidArgumentError("set either `texts` or `token_ids`, not both");
  }
  if (has_pairs) {
    if (has_ids) {
      return absl::InvalidArgumentError(
          "`text_pairs` go with `texts`, not with `token_ids` (token ids are the full model input already)");
    }
    if (text_pairs.size() != texts.size()) {
      return absl::InvalidArgumentError(absl::StrCat("text_pairs has ", text_pairs.size(), " entries but texts has ",
                                                     texts.size(), ": give one per text, or none"));
    }
  }
  const size_t n = has_texts ? texts.size() : token_ids.size();
  if (n == 0) return absl::InvalidArgumentError("no inputs: set `texts` or `token_ids`");
  if (n > static_cast<size_t>(options_.max_inputs_per_request)) {
    return absl::InvalidArgumentError(absl::StrCat("too many inputs: ", n, " (at most ",
                                                   options_.max_inputs_per_request,
                                                   " per request; split the request)"));
  }
  const bool truncate = truncation == Truncation::kTruncate ||
                        (truncation == Truncation::kDefault && options_.truncate_by_default);
  const model::Tokenizer& tokenizer = model_->tokenizer();
  const int64_t vocab = model_->info().vocab_size;

  PreparedRows prepared;
  prepared.rows.resize(n);
  prepared.truncated.assign(n, false);
  prepared.lengths.resize(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<int64_t> ids;
    if (has_texts) {
      const std::string& text = texts[i];
      if (static_cast<int64_t>(text.size()) > options_.max_text_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("texts[", i, "] is ", text.size(), " bytes; at most ",
                                                       options_.max_text_bytes, " are accepted"));
      }
      if (has_pairs && !text_pairs[i].empty()) {
        // A pair: the shared pair rule, which also truncates (longer text first) when allowed.
        const std::string& pair = text_pairs[i];
        if (static_cast<int64_t>(pair.size()) > options_.max_text_bytes) {
          return absl::InvalidArgumentError(absl::StrCat("text_pairs[", i, "] is ", pair.size(), " bytes; at most ",
                                                         options_.max_text_bytes, " are accepted"));
        }
        int64_t full_length = 0;
        auto encoded = model::EncodeTextPair(tokenizer, text, pair,
                                             truncate ? max_sequence_length_ : std::numeric_limits<int64_t>::max(),
                                             &full_length);
        if (!encoded.ok()) {
          return absl::Status(encoded.status().code(), absl::StrCat("texts[", i, "] with text_pairs[", i,
                                                                    "]: ", encoded.status().message()));
        }
        if (full_length > max_sequence_length_) {
          if (!truncate) {
            return absl::InvalidArgumentError(absl::StrCat(
                "texts[", i, "] with text_pairs[", i, "] is ", full_length, " tokens; the model takes at most ",
                max_sequence_length_, " (shorten them, or ask for truncation)"));
          }
          prepared.truncated[i] = true;
        }
        prepared.lengths[i] = static_cast<int64_t>(encoded->size());
        prepared.rows[i].ids = *std::move(encoded);
        continue;
      }
      auto encoded = tokenizer.Encode(text);
      if (!encoded.ok()) {
        return absl::Status(encoded.status().code(), absl::StrCat("texts[", i, "]: ", encoded.status().message()));
      }
      ids = *std::move(encoded);
      if (static_cast<int64_t>(ids.size()) <= tokenizer.NumSpecialTokens()) {
        return absl::InvalidArgumentError(
            absl::StrCat("texts[", i, "] has no tokens (empty or only whitespace / control characters)"));
      }
    } else {
      ids = token_ids[i];
      if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "] is empty"));
      for (size_t j = 0; j < ids.size(); ++j) {
        if (ids[j] < 0 || ids[j] >= vocab) {
          return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "][", j, "] = ", ids[j],
                                                         " is out of range: valid ids are 0..", vocab - 1));
        }
      }
    }
    if (static_cast<int64_t>(ids.size()) > max_sequence_length_) {
      if (!truncate) {
        return absl::InvalidArgumentError(absl::StrCat(
            has_texts ? "texts[" : "token_ids[", i, "] is ", ids.size(), " tokens; the model takes at most ",
            max_sequence_length_, " (shorten it, or ask for truncation)"));
      }
      ids = has_texts ? tokenizer.Truncate(ids, max_sequence_length_)
                      : std::vector<int64_t>(ids.begin(), ids.begin() + max_sequence_length_);
      prepared.truncated[i] = true;
    }
    prepared.lengths[i] = static_cast<int64_t>(ids.size());
    prepared.rows[i].ids = std::move(ids);
  }
  return prepared;
}

namespace {

DeltaInfo InfoOf(const delta::DeltaPack& pack) {
  DeltaInfo info;
  info.digest = pack.digest();
  info.name = pack.manifest().name;
  for (const auto& m : pack.methods()) info.methods.push_back(delta::MethodKindName(m->kind()));
  return info;
}

// Who the batcher schedules a request's rows for, and the method names its metrics count them under.
batching::RequestInfo SchedulingOf(const std::string& tenant, batching::Priority priority,
                                   const delta::DeltaPack* pack, const CallContext& call) {
  batching::RequestInfo info;
  info.tenant = tenant;
  info.priority = priority;
  info.deadline = call.deadline;
  info.is_cancelled = call.is_cancelled;
  if (pack != nullptr) {
    for (const auto& m : pack->methods()) info.delta_methods.push_back(delta::MethodKindName(m->kind()));
  }
  return info;
}

}  // namespace

absl::StatusOr<EmbedResponse> InferenceEngine::Embed(const EmbedRequest& request, const CallContext& call) {
  DS_ASSIGN_OR_RETURN(std::shared_ptr<const delta::DeltaPack> pack, ResolveTask(request.tenant, request.task));
  DS_ASSIGN_OR_RETURN(PreparedRows prepared,
                      PrepareRows(request.texts, request.token_ids, request.text_pairs, request.truncation));
  const size_t n = prepared.rows.size();
  std::vector<std::vector<int64_t>> kept_ids;
  if (request.return_token_ids) {
    kept_ids.reserve(n);
    for (const auto& row : prepared.rows) kept_ids.push_back(row.ids);
  }
  for (auto& row : prepared.rows) {
    row.want_token_states = request.return_token_embeddings;
    row.delta = pack;
  }
  DS_ASSIGN_OR_RETURN(std::vector<batching::RowResult> results,
                      batcher_->Run(std::move(prepared.rows),
                                    SchedulingOf(request.tenant, request.priority, pack.get(), call)));

  EmbedResponse response;
  response.embedding_dim = model_->info().embedding_dim;
  response.hidden_size = model_->info().hidden_size;
  response.results.resize(n);
  for (size_t i = 0; i < n; ++i) {
    EmbedResult& out = response.results[i];
    out.embedding = std::move(results[i].embedding);
    out.token_embeddings = std::move(results[i].token_states);
    out.num_tokens = prepared.lengths[i];
    out.truncated = prepared.truncated[i];
    if (request.return_token_ids) out.token_ids = std::move(kept_ids[i]);
    response.total_tokens += prepared.lengths[i];
  }
  if (pack != nullptr) response.delta = InfoOf(*pack);
  return response;
}

absl::StatusOr<ClassifyResponse> InferenceEngine::Classify(const ClassifyRequest& request, const CallContext& call) {
  if (request.task.empty()) {
    return absl::InvalidArgumentError("Classify needs a `task` whose delta pack has a head");
  }
  if (request.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0 (0 = every label)");
  DS_ASSIGN_OR_RETURN(std::shared_ptr<const delta::DeltaPack> pack, ResolveTask(request.tenant, request.task));
  const delta::Head* head = pack->head();
  if (head == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("the delta pack of task \"", request.task.task, "\" (",
                                                      pack->digest(), ") has no head: use Embed"));
  }
  DS_ASSIGN_OR_RETURN(PreparedRows prepared,
                      PrepareRows(request.texts, request.token_ids, request.text_pairs, request.truncation));
  const size_t n = prepared.rows.size();
  for (auto& row : prepared.rows) {
    row.want_head = true;
    row.delta = pack;
  }
  DS_ASSIGN_OR_RETURN(std::vector<batching::RowResult> results,
                      batcher_->Run(std::move(prepared.rows),
                                    SchedulingOf(request.tenant, request.priority, pack.get(), call)));

  ClassifyResponse response;
  response.regression = head->type() == delta::Head::Type::kRegression;
  response.delta = InfoOf(*pack);
  response.results.resize(n);
  const std::vector<std::string>& labels = head->labels();
  for (size_t i = 0; i < n; ++i) {
    ClassifyResult& out = response.results[i];
    out.num_tokens = prepared.lengths[i];
    out.truncated = prepared.truncated[i];
    response.total_tokens += prepared.lengths[i];
    const std::vector<float>& logits = results[i].head_output;
    if (response.regression) {
      out.value = logits.empty() ? 0.f : logits[0];
      continue;
    }
    // Softmax, then labels best first.
    const float max_logit = logits.empty() ? 0.f : *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
    for (size_t k = 0; k < logits.size() && k < labels.size(); ++k) {
      out.labels.push_back(LabelScore{
          labels[k], static_cast<float>(std::exp(static_cast<double>(logits[k] - max_logit)) / sum), logits[k]});
    }
    std::stable_sort(out.labels.begin(), out.labels.end(),
                     [](const LabelScore& a, const LabelScore& b) { return a.score > b.score; });
    if (request.top_k > 0 && out.labels.size() > static_cast<size_t>(request.top_k)) {
      out.labels.resize(static_cast<size_t>(request.top_k));
    }
  }
  return response;
}

absl::Status InferenceEngine::RunBatch(absl::Span<const batching::BatchRow> rows) {
  // Rows of very different (effective) lengths waste compute on padding: run them as length-sorted passes whose
  // padded tokens stay within max_padding_ratio of their real ones. Unpacked, rows whose packs add soft tokens
  // (prompt tuning) run apart from rows without, which would otherwise all be padded by those tokens; packed,
  // padding costs attention only, and the threshold is packed_max_padding_ratio.
  const double ratio = options_.pack_tokens ? options_.packed_max_padding_ratio : options_.max_padding_ratio;
  std::vector<int64_t> lengths(rows.size());
  std::vector<int> groups;
  if (!options_.pack_tokens && ratio > 0) groups.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const batching::RowInput& input = *rows[i].input;
    const int64_t added = input.delta ? input.delta->added_tokens() : 0;
    lengths[i] = static_cast<int64_t>(input.ids.size()) + added;
    if (!groups.empty()) groups[i] = added > 0 ? 1 : 0;
  }
  const std::vector<std::vector<size_t>> passes =
      batching::PlanForwardPasses(lengths, ratio, groups);
  if (passes.size() == 1 && passes[0].size() == rows.size()) return RunForward(rows);
  for (const std::vector<size_t>& pass : passes) {
    std::vector<batching::BatchRow> subset;
    subset.reserve(pass.size());
    for (size_t index : pass) subset.push_back(rows[index]);
    DS_RETURN_IF_ERROR(RunForward(subset));
  }
  return absl::OkStatus();
}

const delta::DeltaPack* InferenceEngine::MergeCandidate(const std::vector<const delta::DeltaPack*>& packs,
                                                        int64_t tokens) const {
  if (options_.merge_break_even <= 0 || packs.empty() || packs[0] == nullptr) return nullptr;
  for (const delta::DeltaPack* pack : packs) {
    if (pack != packs[0]) return nullptr;
  }
  const int64_t break_even = delta::MergeBreakEvenTokens(*packs[0], *model_);  // INT64_MAX: not mergeable
  return static_cast<double>(tokens) >= options_.merge_break_even * static_cast<double>(break_even)
             ? packs[0]
             : nullptr;
}

absl::StatusOr<model::ForwardOutput> InferenceEngine::RunMerged(const delta::DeltaPack& pack,
                                                                const model::ForwardInput& input) {
  // Merge takes the weights' mutex exclusively until Restore: no other forward reads the merged weights.
  absl::StatusOr<std::unique_ptr<delta::MergedPack>> merged = delta::MergedPack::Merge(pack, *model_);
  if (!merged.ok()) {
    return absl::Status(merged.status().code(),
                        absl::StrCat("merge mode failed, so the batch did not run (an internal error: retry): ",
                                     merged.status().message()));
  }
  absl::StatusOr<model::ForwardOutput> output;
  {
    ServingActivity::Scope serving;  // fine-tuning jobs step aside meanwhile
    output = model_->Forward(input, nullptr);
  }
  absl::Status restored = (*merged)->Restore();
  if (!restored.ok()) {
    DS_LOG(ERROR) << "merge mode: restoring the weights after delta pack " << pack.digest()
                  << " failed; later results may be wrong: " << restored;
    return absl::InternalError(absl::StrCat("merge mode: restoring the weights failed: ", restored.message()));
  }
  if (output.ok()) merged_forwards_.fetch_add(1, std::memory_order_relaxed);
  return output;
}

absl::Status InferenceEngine::RunForward(absl::Span<const batching::BatchRow> rows) {
  const int64_t b = static_cast<int64_t>(rows.size());
  int64_t t = 0, real_tokens = 0;
  std::vector<const delta::DeltaPack*> packs(rows.size(), nullptr);
  bool any_delta = false;
  for (size_t i = 0; i < rows.size(); ++i) {
    t = std::max<int64_t>(t, rows[i].input->ids.size());
    real_tokens += static_cast<int64_t>(rows[i].input->ids.size());
    packs[i] = rows[i].input->delta.get();
    any_delta = any_delta || packs[i] != nullptr;
  }

  model::ForwardInput input;
  input.pack_tokens = options_.pack_tokens;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        c10::InferenceMode guard;
        input.input_ids = at::zeros({b, t}, at::kLong);
        input.attention_mask = at::zeros({b, t}, at::kBool);
        int64_t* ids = input.input_ids.data_ptr<int64_t>();
        bool* mask = input.attention_mask.data_ptr<bool>();
        for (int64_t i = 0; i < b; ++i) {
          const std::vector<int64_t>& row = rows[i].input->ids;
          std::memcpy(ids + i * t, row.data(), row.size() * sizeof(int64_t));
          std::fill(mask + i * t, mask + i * t + static_cast<int64_t>(row.size()), true);
        }
      },
      "building the batch"));

  std::unique_ptr<delta::DeltaBatch> hooks;
  model::ForwardOutput output;
  // The hooks' cost grows with the tokens the layers run on: the real ones packed, rows x longest padded.
  if (const delta::DeltaPack* pack = MergeCandidate(packs, options_.pack_tokens ? real_tokens : b * t)) {
    DS_ASSIGN_OR_RETURN(output, RunMerged(*pack, input));
  } else {
    if (any_delta) {
      DS_ASSIGN_OR_RETURN(hooks, delta::DeltaBatch::Create(packs, *model_));
    }
    absl::ReaderMutexLock weights_lock(&model_->weights_mutex());  // no merge rewrites the weights under us
    ServingActivity::Scope serving;  // fine-tuning jobs step aside meanwhile (after the lock: see the header)
    DS_ASSIGN_OR_RETURN(output, model_->Forward(input, hooks.get()));
  }

  // Heads: one Apply per distinct pack over its rows' sentence embeddings.
  std::map<const delta::DeltaPack*, std::vector<int64_t>> head_rows;
  for (int64_t i = 0; i < b; ++i) {
    if (rows[i].input->want_head && packs[i] != nullptr && packs[i]->head() != nullptr) {
      head_rows[packs[i]].push_back(i);
    }
  }
  for (const auto& [pack, indices] : head_rows) {
    DS_ASSIGN_OR_RETURN(at::Tensor selected, TorchCall(
        [&] {
          return output.pooled.index_select(0, at::tensor(indices, at::kLong).to(output.pooled.device()));
        },
        "selecting head rows"));
    DS_ASSIGN_OR_RETURN(at::Tensor logits, pack->head()->Apply(selected));
    DS_RETURN_IF_ERROR(TorchCallVoid(
        [&] {
          at::Tensor cpu = logits.to(at::kCPU, at::kFloat).contiguous();
          const int64_t k = cpu.size(1);
          const float* p = cpu.data_ptr<float>();
          for (size_t j = 0; j < indices.size(); ++j) {
            rows[indices[j]].result->head_output.assign(p + j * k, p + (j + 1) * k);
          }
        },
        "reading head outputs"));
  }

  return TorchCallVoid(
      [&] {
        at::Tensor pooled = output.pooled.to(at::kCPU, at::kFloat).contiguous();
        const int64_t d = pooled.size(1);
        const float* p = pooled.data_ptr<float>();
        at::Tensor hidden;
        int64_t h = 0, tt = 0;
        const float* hp = nullptr;
        for (int64_t i = 0; i < b; ++i) {
          batching::RowResult& result = *rows[i].result;
          result.embedding.assign(p + i * d, p + (i + 1) * d);
          if (rows[i].input->want_token_states) {
            if (!hidden.defined()) {
              hidden = output.hidden_states.to(at::kCPU, at::kFloat).contiguous();
              tt = hidden.size(1);
              h = hidden.size(2);
              hp = hidden.data_ptr<float>();
            }
            // Skip soft prompt positions: the caller gets its own tokens' states.
            const int64_t lead = hooks != nullptr ? hooks->LeadingVirtualTokens(i) : 0;
            const int64_t len = static_cast<int64_t>(rows[i].input->ids.size());
            const float* row = hp + (i * tt + lead) * h;
            result.token_states.assign(row, row + len * h);
          }
        }
      },
      "reading the batch output");
}

}  // namespace inference
}  // namespace deltaserve
