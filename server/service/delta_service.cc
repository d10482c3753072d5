#include "server/service/delta_service.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/status_macros.h"
#include "server/service/grpc_status.h"
#include "server/service/upload_stream.h"

namespace deltaserve {
namespace service {
namespace {

namespace pb = ::deltaserve::v1;

void ToProto(const store::VersionInfo& in, pb::DeltaVersion* out) {
  out->set_tenant(in.tenant);
  out->set_task(in.task);
  out->set_version(in.version);
  out->set_digest(in.digest);
  out->set_size_bytes(in.size);
  out->set_created_unix_micros(absl::ToUnixMicros(in.created));
  for (const std::string& label : in.labels) out->add_labels(label);
}

void ToProto(const deltas::PackSummary& in, pb::DeltaPackSummary* out) {
  out->set_name(in.name);
  for (const std::string& m : in.methods) out->add_methods(m);
  out->set_backbone_fingerprint(in.backbone_fingerprint);
  out->set_backbone_family(in.backbone_family);
  out->set_head_kind(in.head_kind);
  for (const std::string& l : in.head_labels) out->add_head_labels(l);
  out->set_description(in.description);
}

}  // namespace

DeltaServiceImpl::DeltaServiceImpl(deltas::DeltaManager* manager, metrics::ServerMetrics* metrics,
                                   const CallSecurity* security, const Options& options)
    : manager_(manager), metrics_(metrics), security_(security), options_(options) {}

grpc::Status DeltaServiceImpl::PushDelta(grpc::ServerContext* context,
                                         grpc::ServerReader<pb::PushDeltaRequest>* reader,
                                         pb::PushDeltaResponse* response) {
  const absl::Time start = absl::Now();
  // The caller is checked before any byte is read, the tenant in the header before any chunk is.
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, "");
  pb::PushDeltaHeader header;
  std::string bytes;
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    status = ReadUploadStream(context, reader, options_.max_push_bytes, "PushDelta", "pack", &header, &bytes,
                              [&](const pb::PushDeltaHeader& h) { return CallSecurity::ActFor(&*admitted, h.tenant()); });
  }
  std::string detail;
  if (status.ok()) {
    deltas::PushRequest request;
    request.tenant = admitted->tenant;
    request.task = header.task();
    request.expected_digest = header.expected_digest();
    request.labels.assign(header.labels().begin(), header.labels().end());
    metrics_->RecordStoreBytes(/*push=*/true, static_cast<int64_t>(bytes.size()));
    absl::StatusOr<deltas::PushResult> result = manager_->Push(request, bytes);
    status = result.status();
    if (result.ok()) {
      ToProto(result->version, response->mutable_version());
      response->set_created(result->created);
      response->set_uploaded_digest(result->uploaded_digest);
      ToProto(result->pack, response->mutable_pack());
      detail = absl::StrCat("version ", result->version.version, " ", result->version.digest,
                            result->created ? "" : " (already stored)");
    }
  }
  security_->Audit(context, admitted, header.tenant(), "delta.push", header.task(), detail, status);
  metrics_->RecordRequest("PushDelta", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::GetDelta(grpc::ServerContext* context, const pb::GetDeltaRequest* request,
                                        pb::GetDeltaResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    absl::StatusOr<deltas::PackDescription> result = manager_->Get(admitted->tenant, request->ref());
    if (result.ok()) {
      ToProto(result->version, response->mutable_version());
      ToProto(result->pack, response->mutable_pack());
    }
    status = result.status();
  }
  metrics_->RecordRequest("GetDelta", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::PullDelta(grpc::ServerContext* context, const pb::PullDeltaRequest* request,
                                         grpc::ServerWriter<pb::PullDeltaResponse>* writer) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  auto send = [&]() -> absl::Status {
    if (!admitted.ok()) return admitted.status();
    if (request->chunk_bytes() < 0) return absl::InvalidArgumentError("PullDelta: chunk_bytes must be >= 0");
    const size_t chunk = static_cast<size_t>(request->chunk_bytes() == 0
                                                 ? options_.default_chunk_bytes
                                                 : std::min(request->chunk_bytes(), options_.default_chunk_bytes));
    auto opened = manager_->OpenPull(admitted->tenant, request->ref());
    if (!opened.ok()) return opened.status();
    pb::PullDeltaResponse message;
    ToProto(opened->first, message.mutable_version());
    if (!writer->Write(message)) return absl::CancelledError("PullDelta: the client went away");
    std::vector<char> buffer(chunk);
    int64_t sent = 0;
    while (true) {
      absl::StatusOr<size_t> n = opened->second->Read(buffer.data(), buffer.size());
      if (!n.ok()) return n.status();  // DATA_LOSS: the stored bytes do not match their digest
      if (*n == 0) break;
      message.set_chunk(buffer.data(), *n);
      if (!writer->Write(message)) return absl::CancelledError("PullDelta: the client went away");
      sent += static_cast<int64_t>(*n);
    }
    metrics_->RecordStoreBytes(/*push=*/false, sent);
    return absl::OkStatus();
  };
  const absl::Status status = send();
  metrics_->RecordRequest("PullDelta", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::ListDeltas(grpc::ServerContext* context, const pb::ListDeltasRequest* request,
                                          pb::ListDeltasResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok() && request->all_tenants()) {
    if (!request->tenant().empty() || !request->task().empty()) {
      status = absl::InvalidArgumentError("all_tenants lists every tenant's versions: leave tenant and task empty");
    } else if (!admitted->caller.admin) {
      status = absl::PermissionDeniedError("all_tenants needs the admin role");
    }
  }
  if (admitted.ok() && status.ok()) {
    absl::StatusOr<store::ListPage> page =
        request->all_tenants()
            ? manager_->ListAllTenants(request->page_size(), request->page_token())
            : manager_->List(admitted->tenant, request->task(), request->page_size(), request->page_token());
    if (page.ok()) {
      for (const store::VersionInfo& v : page->versions) ToProto(v, response->add_versions());
      response->set_next_page_token(page->next_page_token);
    }
    status = page.status();
  }
  metrics_->RecordRequest("ListDeltas", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::SetLabel(grpc::ServerContext* context, const pb::SetLabelRequest* request,
                                        pb::SetLabelResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    absl::StatusOr<store::VersionInfo> version =
        manager_->SetLabel(admitted->tenant, request->task(), request->label(), request->version());
    if (version.ok()) ToProto(*version, response->mutable_version());
    status = version.status();
  }
  security_->Audit(context, admitted, request->tenant(), "label.set",
                   absl::StrCat(request->task(), ":", request->label()),
                   absl::StrCat("version ", request->version()), status);
  metrics_->RecordRequest("SetLabel", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::DeleteLabel(grpc::ServerContext* context, const pb::DeleteLabelRequest* request,
                                           pb::DeleteLabelResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) status = manager_->DeleteLabel(admitted->tenant, request->task(), request->label());
  security_->Audit(context, admitted, request->tenant(), "label.delete",
                   absl::StrCat(request->task(), ":", request->label()), "", status);
  metrics_->RecordRequest("DeleteLabel", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status DeltaServiceImpl::DeleteVersion(grpc::ServerContext* context, const pb::DeleteVersionRequest* request,
                                             pb::DeleteVersionResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) status = manager_->DeleteVersion(admitted->tenant, request->task(), request->version());
  security_->Audit(context, admitted, request->tenant(), "version.delete",
                   absl::StrCat(request->task(), "@", request->version()), "", status);
  metrics_->RecordRequest("DeleteVersion", status.code(), absl::Now() - start);
  return Answer(context, status);
}

}  // namespace service
}  // namespace deltaserve
