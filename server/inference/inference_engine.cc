#include "server/inference/inference_engine.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

namespace deltaserve {
namespace inference {

InferenceEngine::InferenceEngine(std::shared_ptr<const model::Model> model, const Options& options,
                                 batching::BatcherObserver* observer)
    : model_(std::move(model)),
      options_(options),
      max_sequence_length_(options.max_sequence_length > 0
                               ? std::min(options.max_sequence_length, model_->info().max_sequence_length)
                               : model_->info().max_sequence_length) {
  batcher_ = std::make_unique<batching::Batcher>(
      options_.batching, [this](absl::Span<const batching::BatchRow> rows) { return RunBatch(rows); }, observer);
}

InferenceEngine::~InferenceEngine() { Stop(); }

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Create(
    std::shared_ptr<const model::Model> model, const Options& options, batching::BatcherObserver* observer) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  if (options.max_inputs_per_request < 1) {
    return absl::InvalidArgumentError("max_inputs_per_request must be at least 1");
  }
  if (options.batching.max_batch_rows < 1 || options.batching.max_batch_tokens < 1) {
    return absl::InvalidArgumentError("max_batch_rows and max_batch_tokens must be at least 1");
  }
  const int64_t specials = model->tokenizer().NumSpecialTokens();
  if (options.max_sequence_length != 0 && options.max_sequence_length <= specials) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sequence_length must exceed the model's ", specials, " special tokens"));
  }
  return std::unique_ptr<InferenceEngine>(new InferenceEngine(std::move(model), options, observer));
}

void InferenceEngine::Stop() {
  if (batcher_) batcher_->Stop();
}

absl::StatusOr<EmbedResponse> InferenceEngine::Embed(const EmbedRequest& request, const CallContext& call) {
  if (!request.task.empty()) {
    return absl::FailedPreconditionError(
        "this server has no delta store yet: leave `task` unset to use the base model");
  }
  const bool has_texts = !request.texts.empty();
  const bool has_ids = !request.token_ids.empty();
  if (has_texts && has_ids) {
    return absl::InvalidArgumentError("set either `texts` or `token_ids`, not both");
  }
  const size_t n = has_texts ? request.texts.size() : request.token_ids.size();
  if (n == 0) return absl::InvalidArgumentError("no inputs: set `texts` or `token_ids`");
  if (n > static_cast<size_t>(options_.max_inputs_per_request)) {
    return absl::InvalidArgumentError(absl::StrCat("too many inputs: ", n, " (at most ",
                                                   options_.max_inputs_per_request,
                                                   " per request; split the request)"));
  }
  const bool truncate = request.truncation == Truncation::kTruncate ||
                        (request.truncation == Truncation::kDefault && options_.truncate_by_default);
  const model::Tokenizer& tokenizer = model_->tokenizer();
  const int64_t vocab = tokenizer.vocab_size();

  std::vector<batching::RowInput> rows(n);
  std::vector<bool> truncated(n, false);
  for (size_t i = 0; i < n; ++i) {
    std::vector<int64_t> ids;
    if (has_texts) {
      const std::string& text = request.texts[i];
      if (static_cast<int64_t>(text.size()) > options_.max_text_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("texts[", i, "] is ", text.size(), " bytes; at most ",
                                                       options_.max_text_bytes, " are accepted"));
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
      ids = request.token_ids[i];
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
      truncated[i] = true;
    }
    rows[i].ids = std::move(ids);
    rows[i].want_token_states = request.return_token_embeddings;
  }

  // Keep the ids for the response before the batcher takes the rows.
  std::vector<std::vector<int64_t>> kept_ids;
  if (request.return_token_ids) {
    kept_ids.reserve(n);
    for (const auto& row : rows) kept_ids.push_back(row.ids);
  }
  std::vector<int64_t> lengths(n);
  for (size_t i = 0; i < n; ++i) lengths[i] = static_cast<int64_t>(rows[i].ids.size());

  DS_ASSIGN_OR_RETURN(std::vector<batching::RowResult> results,
                      batcher_->Run(std::move(rows), call.deadline, call.is_cancelled));

  EmbedResponse response;
  response.embedding_dim = model_->info().embedding_dim;
  response.hidden_size = model_->info().hidden_size;
  response.results.resize(n);
  for (size_t i = 0; i < n; ++i) {
    EmbedResult& out = response.results[i];
    out.embedding = std::move(results[i].embedding);
    out.token_embeddings = std::move(results[i].token_states);
    out.num_tokens = lengths[i];
    out.truncated = truncated[i];
    if (request.return_token_ids) out.token_ids = std::move(kept_ids[i]);
    response.total_tokens += lengths[i];
  }
  return response;
}

absl::Status InferenceEngine::RunBatch(absl::Span<const batching::BatchRow> rows) {
  // Rows of very different lengths waste compute on padding: run them as length-sorted sub-batches whose padded
  // tokens stay within max_padding_ratio of their real tokens.
  const double ratio = options_.max_padding_ratio;
  int64_t longest = 0, real = 0;
  for (const auto& row : rows) {
    longest = std::max<int64_t>(longest, row.input->ids.size());
    real += static_cast<int64_t>(row.input->ids.size());
  }
  if (ratio <= 0 || static_cast<double>(longest) * static_cast<double>(rows.size()) <= ratio * real) {
    return RunForward(rows);
  }
  std::vector<batching::BatchRow> sorted(rows.begin(), rows.end());
  std::stable_sort(sorted.begin(), sorted.end(), [](const batching::BatchRow& a, const batching::BatchRow& b) {
    return a.input->ids.size() < b.input->ids.size();
  });
  size_t start = 0;
  int64_t chunk_real = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const int64_t len = static_cast<int64_t>(sorted[i].input->ids.size());
    const size_t n = i - start;
    if (n > 0 && static_cast<double>(len) * static_cast<double>(n + 1) > ratio * (chunk_real + len)) {
      DS_RETURN_IF_ERROR(RunForward(absl::MakeConstSpan(sorted).subspan(start, n)));
      start = i;
      chunk_real = 0;
    }
    chunk_real += len;
  }
  return RunForward(absl::MakeConstSpan(sorted).subspan(start));
}

absl::Status InferenceEngine::RunForward(absl::Span<const batching::BatchRow> rows) {
  const int64_t b = static_cast<int64_t>(rows.size());
  int64_t t = 0;
  for (const auto& row : rows) t = std::max<int64_t>(t, row.input->ids.size());

  model::ForwardInput input;
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

  DS_ASSIGN_OR_RETURN(model::ForwardOutput output, model_->Forward(input, /*hooks=*/nullptr));

  return TorchCallVoid(
      [&] {
        at::Tensor pooled = output.pooled.contiguous();
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
              hidden = output.hidden_states.contiguous();
              tt = hidden.size(1);
              h = hidden.size(2);
              hp = hidden.data_ptr<float>();
            }
            const int64_t len = static_cast<int64_t>(rows[i].input->ids.size());
            const float* row = hp + i * tt * h;
            result.token_states.assign(row, row + len * h);
          }
        }
      },
      "reading the batch output");
}

}  // namespace inference
}  // namespace deltaserve
