// DeltaserveClient: a small synchronous C++ client for a deltaserve server (deltaserve.v1 and grpc.health.v1).
//
// Owns one gRPC channel. Thread-safe: gRPC channels and stubs may be shared across threads.
// Every call returns absl::Status / StatusOr with the server's code and message.
#ifndef DELTASERVE_CLIENT_CLIENT_H_
#define DELTASERVE_CLIENT_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include <functional>

#include "absl/strings/string_view.h"
#include "deltaserve/v1/deltas.grpc.pb.h"
#include "deltaserve/v1/inference.grpc.pb.h"
#include "deltaserve/v1/tuning.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace deltaserve {
namespace client {

class DeltaserveClient {
 public:
  struct Options {
    // "host:port" of the server.
    std::string target = "127.0.0.1:50051";
    // Deadline of each call.
    absl::Duration timeout = absl::Seconds(30);
    // Largest response accepted, in bytes (-1 = no limit).
    int max_receive_message_bytes = -1;
    // API token sent as `authorization: Bearer <token>` on every call ("" = none; docs/SECURITY.md).
    std::string token;
    // TLS: on when tls is set or any file below is given. tls_ca_file: PEM roots to verify the server with (""
    // = the system's); tls_cert_file / tls_key_file: a client certificate (mutual TLS); tls_server_name: the
    // name to verify in the server's certificate ("" = the target's host).
    bool tls = false;
    std::string tls_ca_file;
    std::string tls_cert_file;
    std::string tls_key_file;
    std::string tls_server_name;
  };

  // A client whose TLS files could be read. INVALID_ARGUMENT naming an unreadable file.
  static absl::StatusOr<std::unique_ptr<DeltaserveClient>> Create(const Options& options);

  // REQUIRES: the TLS files (if any) are readable; else calls fail with UNAVAILABLE. Prefer Create().
  explicit DeltaserveClient(const Options& options);

  // grpc.health.v1 Check for `service` ("" = the whole server): "SERVING", "NOT_SERVING", ...
  absl::StatusOr<std::string> Health(const std::string& service = "");
  absl::StatusOr<deltaserve::v1::GetModelInfoResponse> GetModelInfo();
  absl::StatusOr<deltaserve::v1::EmbedResponse> Embed(const deltaserve::v1::EmbedRequest& request);
  absl::StatusOr<deltaserve::v1::ClassifyResponse> Classify(const deltaserve::v1::ClassifyRequest& request);
  // Loads tasks' packs into the server's pack cache ahead of requests.
  absl::StatusOr<deltaserve::v1::PrefetchResponse> Prefetch(const deltaserve::v1::PrefetchRequest& request);
  // Sentence embeddings of `texts` on the base model.
  absl::StatusOr<std::vector<std::vector<float>>> EmbedTexts(const std::vector<std::string>& texts);

  // --- The delta store (deltaserve.v1.DeltaService) ---
  // Called after each chunk is sent (or received): bytes so far, total bytes.
  using Progress = std::function<void(int64_t done, int64_t total)>;
  // Streams `bytes` as a pack of header.task (header.size_bytes and expected_digest are filled in). The deadline
  // is the client's timeout plus one second per MiB.
  absl::StatusOr<deltaserve::v1::PushDeltaResponse> PushDelta(deltaserve::v1::PushDeltaHeader header,
                                                              absl::string_view bytes,
                                                              const Progress& progress = nullptr);
  absl::StatusOr<deltaserve::v1::GetDeltaResponse> GetDelta(const std::string& tenant, const std::string& ref);
  // The version `ref` names and its bytes (appended to *bytes).
  absl::StatusOr<deltaserve::v1::DeltaVersion> PullDelta(const std::string& tenant, const std::string& ref,
                                                         std::string* bytes, const Progress& progress = nullptr);
  absl::StatusOr<deltaserve::v1::ListDeltasResponse> ListDeltas(const deltaserve::v1::ListDeltasRequest& request);
  absl::StatusOr<deltaserve::v1::SetLabelResponse> SetLabel(const deltaserve::v1::SetLabelRequest& request);
  absl::Status DeleteLabel(const deltaserve::v1::DeleteLabelRequest& request);
  absl::Status DeleteVersion(const deltaserve::v1::DeleteVersionRequest& request);

  // --- Fine-tuning jobs (deltaserve.v1.TuningService) ---
  // Streams a dataset file (size and digest are sent along); returns its digest for a JobSpec.
  absl::StatusOr<deltaserve::v1::UploadDatasetResponse> UploadDataset(const std::string& tenant,
                                                                      absl::string_view bytes,
                                                                      const Progress& progress = nullptr);
  absl::StatusOr<deltaserve::v1::SubmitJobResponse> SubmitJob(const deltaserve::v1::SubmitJobRequest& request);
  absl::StatusOr<deltaserve::v1::Job> GetJob(const std::string& tenant, const std::string& id);
  absl::StatusOr<deltaserve::v1::ListJobsResponse> ListJobs(const deltaserve::v1::ListJobsRequest& request);
  absl::StatusOr<deltaserve::v1::Job> CancelJob(const std::string& tenant, const std::string& id);
  // Calls on_event for every event until the job finishes (returns its final state), on_event returns false, or
  // `timeout` passes (DEADLINE_EXCEEDED; the job keeps running).
  absl::StatusOr<deltaserve::v1::Job> WatchJob(const std::string& tenant, const std::string& id,
                                               const std::function<bool(const deltaserve::v1::Job&)>& on_event,
                                               absl::Duration timeout = absl::InfiniteDuration());

 private:
  const Options options_;
  const std::string authorization_;  // "Bearer <token>", or ""
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<deltaserve::v1::InferenceService::Stub> inference_;
  std::unique_ptr<deltaserve::v1::DeltaService::Stub> deltas_;
  std::unique_ptr<deltaserve::v1::TuningService::Stub> tuning_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// grpc::Status -> absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace client
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_CLIENT_H_
