#include "server/service/inference_service.h"

#include <optional>
#include <string>
#include <utility>

#include "absl/time/clock.h"
#include "server/batching/batcher.h"
#include "server/service/grpc_status.h"

namespace deltaserve {
namespace service {
namespace {

namespace pb = ::deltaserve::v1;

inference::TaskSelector FromProto(const pb::TaskRef& task);
inference::Truncation FromProto(pb::Truncation truncation);
batching::Priority FromProto(pb::Priority priority);

inference::EmbedRequest FromProto(const pb::EmbedRequest& in) {
  inference::EmbedRequest out;
  out.tenant = in.tenant();
  if (in.has_task()) out.task = FromProto(in.task());
  out.texts.assign(in.texts().begin(), in.texts().end());
  out.text_pairs.assign(in.text_pairs().begin(), in.text_pairs().end());
  out.token_ids.reserve(in.token_ids_size());
  for (const pb::TokenIds& ids : in.token_ids()) out.token_ids.emplace_back(ids.ids().begin(), ids.ids().end());
  out.return_token_embeddings = in.return_token_embeddings();
  out.return_token_ids = in.return_token_ids();
  out.truncation = FromProto(in.truncation());
  out.priority = FromProto(in.priority());
  return out;
}

void ToProto(const inference::DeltaInfo& in, pb::DeltaInfo* out) {
  out->set_digest(in.digest);
  out->set_name(in.name);
  for (const std::string& m : in.methods) out->add_methods(m);
}

inference::TaskSelector FromProto(const pb::TaskRef& task) {
  inference::TaskSelector out;
  out.task = task.task();
  switch (task.selector_case()) {
    case pb::TaskRef::kVersion:
      out.version = task.version();
      if (out.version == 0) out.version = -1;  // set but invalid: still "not empty"
      break;
    case pb::TaskRef::kLabel:
      out.label = task.label();
      break;
    case pb::TaskRef::kDigest:
      out.digest = task.digest();
      break;
    case pb::TaskRef::SELECTOR_NOT_SET:
      break;
  }
  return out;
}

batching::Priority FromProto(pb::Priority priority) {
  switch (priority) {
    case pb::PRIORITY_LOW:
      return batching::Priority::kLow;
    case pb::PRIORITY_HIGH:
      return batching::Priority::kHigh;
    default:
      return batching::Priority::kNormal;
  }
}

inference::Truncation FromProto(pb::Truncation truncation) {
  switch (truncation) {
    case pb::TRUNCATION_TRUNCATE:
      return inference::Truncation::kTruncate;
    case pb::TRUNCATION_ERROR:
      return inference::Truncation::kError;
    default:
      return inference::Truncation::kDefault;
  }
}

inference::ClassifyRequest FromProto(const pb::ClassifyRequest& in) {
  inference::ClassifyRequest out;
  out.tenant = in.tenant();
  if (in.has_task()) out.task = FromProto(in.task());
  out.texts.assign(in.texts().begin(), in.texts().end());
  out.text_pairs.assign(in.text_pairs().begin(), in.text_pairs().end());
  out.token_ids.reserve(in.token_ids_size());
  for (const pb::TokenIds& ids : in.token_ids()) out.token_ids.emplace_back(ids.ids().begin(), ids.ids().end());
  out.truncation = FromProto(in.truncation());
  out.top_k = in.top_k();
  out.priority = FromProto(in.priority());
  return out;
}

void ToProto(const inference::ClassifyResponse& in, const std::string& model_name, pb::ClassifyResponse* out) {
  out->set_model(model_name);
  ToProto(in.delta, out->mutable_delta());
  for (const inference::ClassifyResult& r : in.results) {
    pb::ClassifyResult* result = out->add_results();
    for (const inference::LabelScore& l : r.labels) {
      pb::LabelScore* label = result->add_labels();
      label->set_label(l.label);
      label->set_score(l.score);
      label->set_logit(l.logit);
    }
    result->set_value(r.value);
    result->set_num_tokens(static_cast<int32_t>(r.num_tokens));
    result->set_truncated(r.truncated);
  }
}

pb::CacheTier ToProto(deltas::CacheTier tier) {
  switch (tier) {
    case deltas::CacheTier::kDevice:
      return pb::CACHE_TIER_DEVICE;
    case deltas::CacheTier::kHost:
      return pb::CACHE_TIER_HOST;
    case deltas::CacheTier::kStore:
      return pb::CACHE_TIER_STORE;
  }
  return pb::CACHE_TIER_UNSPECIFIED;
}

void ToProto(const deltas::PrefetchResult& in, pb::PrefetchedDelta* out) {
  out->set_tenant(in.version.tenant);
  out->set_task(in.version.task);
  out->set_version(in.version.version);
  out->set_digest(in.version.digest);
  out->set_source(ToProto(in.source));
  out->set_device_bytes(in.device_bytes);
  out->set_serialized_bytes(in.serialized_bytes);
  out->set_load_seconds(absl::ToDoubleSeconds(in.load_time));
  out->set_resident(in.resident);
}

void ToProto(inference::EmbedResponse&& in, const std::string& model_name, pb::EmbedResponse* out) {
  out->set_model(model_name);
  if (in.delta.has_value()) ToProto(*in.delta, out->mutable_delta());
  out->mutable_results()->Reserve(static_cast<int>(in.results.size()));
  for (inference::EmbedResult& r : in.results) {
    pb::EmbedResult* result = out->add_results();
    result->mutable_embedding()->mutable_values()->Add(r.embedding.begin(), r.embedding.end());
    result->set_num_tokens(static_cast<int32_t>(r.num_tokens));
    result->set_truncated(r.truncated);
    if (!r.token_embeddings.empty()) {
      const int64_t h = in.hidden_size;
      for (int64_t t = 0; t < r.num_tokens; ++t) {
        auto* values = result->add_token_embeddings()->mutable_values();
        values->Add(r.token_embeddings.begin() + t * h, r.token_embeddings.begin() + (t + 1) * h);
      }
    }
    result->mutable_token_ids()->Add(r.token_ids.begin(), r.token_ids.end());
  }
}

}  // namespace

InferenceServiceImpl::InferenceServiceImpl(inference::InferenceEngine* engine, metrics::ServerMetrics* metrics,
                                           ServerFacts facts, deltas::DeltaManager* deltas,
                                           const CallSecurity* security)
    : engine_(engine), metrics_(metrics), facts_(std::move(facts)), deltas_(deltas), security_(security) {}

grpc::Status InferenceServiceImpl::Embed(grpc::ServerContext* context, const pb::EmbedRequest* request,
                                         pb::EmbedResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    inference::CallContext call;
    call.deadline = absl::FromChrono(context->deadline());
    call.is_cancelled = [context] { return context->IsCancelled(); };
    inference::EmbedRequest embed = FromProto(*request);
    embed.tenant = admitted->tenant;
    absl::StatusOr<inference::EmbedResponse> result = engine_->Embed(embed, call);
    if (result.ok()) {
      metrics_->RecordInputs(static_cast<int64_t>(result->results.size()), result->total_tokens);
      ToProto(*std::move(result), engine_->model().info().name, response);
    }
    status = result.status();
  }
  metrics_->RecordRequest("Embed", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status InferenceServiceImpl::Classify(grpc::ServerContext* context, const pb::ClassifyRequest* request,
                                            pb::ClassifyResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    inference::CallContext call;
    call.deadline = absl::FromChrono(context->deadline());
    call.is_cancelled = [context] { return context->IsCancelled(); };
    inference::ClassifyRequest classify = FromProto(*request);
    classify.tenant = admitted->tenant;
    absl::StatusOr<inference::ClassifyResponse> result = engine_->Classify(classify, call);
    if (result.ok()) {
      metrics_->RecordInputs(static_cast<int64_t>(result->results.size()), result->total_tokens);
      ToProto(*result, engine_->model().info().name, response);
    }
    status = result.status();
  }
  metrics_->RecordRequest("Classify", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status InferenceServiceImpl::GetModelInfo(grpc::ServerContext* context,
                                                const pb::GetModelInfoRequest* request,
                                                pb::GetModelInfoResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, "");
  if (!admitted.ok()) {
    metrics_->RecordRequest("GetModelInfo", admitted.status().code(), absl::Now() - start);
    return Answer(context, admitted.status());
  }
  const model::ModelInfo& info = engine_->model().info();
  pb::ModelInfo* m = response->mutable_model();
  m->set_family(info.family);
  m->set_name(info.name);
  m->set_embedding_dim(info.embedding_dim);
  m->set_hidden_size(info.hidden_size);
  m->set_num_layers(info.num_layers);
  m->set_num_heads(info.num_heads);
  m->set_vocab_size(info.vocab_size);
  m->set_max_sequence_length(engine_->max_sequence_length());
  m->set_num_parameters(info.num_parameters);
  m->set_pooling(info.pooling);
  m->set_dtype(info.dtype);
  m->set_device(info.device);
  m->set_fingerprint(info.fingerprint);
  m->set_num_special_tokens(static_cast<int32_t>(engine_->model().tokenizer().NumSpecialTokens()));
  const inference::InferenceEngine::Options& options = engine_->options();
  pb::ServerLimits* limits = response->mutable_limits();
  limits->set_max_inputs_per_request(options.max_inputs_per_request);
  limits->set_max_text_bytes(options.max_text_bytes);
  limits->set_max_receive_message_bytes(facts_.max_receive_message_bytes);
  limits->set_max_batch_rows(options.batching.max_batch_rows);
  limits->set_max_batch_tokens(options.batching.max_batch_tokens);
  limits->set_truncate_by_default(options.truncate_by_default);
  response->set_server_version(facts_.server_version);
  response->set_api_version("deltaserve.v1");
  response->set_torch_version(facts_.torch_version);
  response->set_blas(facts_.blas);
  response->set_intra_op_threads(facts_.intra_op_threads);
  response->set_model_load_seconds(facts_.model_load_seconds);
  response->set_num_deltas(facts_.num_deltas());
  metrics_->RecordRequest("GetModelInfo", absl::StatusCode::kOk, absl::Now() - start);
  return grpc::Status::OK;
}

grpc::Status InferenceServiceImpl::Prefetch(grpc::ServerContext* context, const pb::PrefetchRequest* request,
                                            pb::PrefetchResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok() && deltas_ == nullptr) status = absl::UnimplementedError("this server has no delta manager");
  if (admitted.ok() && deltas_ != nullptr) {
    std::vector<inference::TaskSelector> selectors;
    selectors.reserve(request->tasks_size());
    for (const pb::TaskRef& task : request->tasks()) selectors.push_back(FromProto(task));
    absl::StatusOr<std::vector<deltas::PrefetchResult>> result = deltas_->Prefetch(admitted->tenant, selectors);
    if (result.ok()) {
      for (const deltas::PrefetchResult& r : *result) ToProto(r, response->add_deltas());
    }
    status = result.status();
  }
  metrics_->RecordRequest("Prefetch", status.code(), absl::Now() - start);
  return Answer(context, status);
}

}  // namespace service
}  // namespace deltaserve
