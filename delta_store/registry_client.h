// RegistryClient: the few calls of the OCI Distribution API (HTTP/1.1, through libcurl) that the OCI registry
// store needs: blob upload (POST, chunked PATCH, PUT ?digest=), cross-repository mount, HEAD/GET/DELETE of blobs
// and manifests, tag lists and the catalog. It knows HTTP and the wire format, nothing about packs or versions.
//
// HTTP errors become statuses: 404 NOT_FOUND, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 400 INVALID_ARGUMENT,
// 405 FAILED_PRECONDITION (the registry does not allow the operation, e.g. deletes), 429 and 5xx UNAVAILABLE,
// and a registry that cannot be reached (refused, timed out, bad host) UNAVAILABLE; each message names the
// method and URL and the registry's own error text.
//
// Owns a small pool of curl handles (which keep their connections alive). Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_REGISTRY_CLIENT_H_
#define DELTASERVE_DELTA_STORE_REGISTRY_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace store {

// The media type of the manifests this client puts and asks for.
inline constexpr char kOciManifestMediaType[] = "application/vnd.oci.image.manifest.v1+json";

struct RegistryClientOptions {
  // Base URL of the registry: scheme, host and port, no path ("http://127.0.0.1:5000").
  std::string url = "http://127.0.0.1:5000";
  // Sent as "Authorization: Bearer <token>" when not empty (a static token; the token-server challenge flow is
  // not implemented).
  std::string bearer_token;
  // HTTP basic credentials, used when `username` is not empty and there is no bearer token.
  std::string username;
  std::string password;
  // Time to establish a connection.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Time for one whole request, transfer included.
  absl::Duration request_timeout = absl::Minutes(5);
  // Blobs larger than this are uploaded in PATCH chunks of this size; smaller ones in one PUT.
  int64_t chunk_size = int64_t{8} << 20;
};

class RegistryClient {
 public:
  // INVALID_ARGUMENT when the URL is not http(s)://host[:port].
  static absl::StatusOr<std::unique_ptr<RegistryClient>> Create(const RegistryClientOptions& options);
  ~RegistryClient();
  RegistryClient(const RegistryClient&) = delete;
  RegistryClient& operator=(const RegistryClient&) = delete;

  const std::string& url() const { return options_.url; }

  // GET /v2/: OK when the registry answers and accepts our credentials.
  absl::Status Ping();

  // --- Blobs ---
  // The blob's size (HEAD). NOT_FOUND when `repo` has no such blob.
  absl::StatusOr<int64_t> HeadBlob(const std::string& repo, const std::string& digest);
  // Uploads `size` bytes as blob `digest` of `repo`; `read(offset, n, out)` supplies them in order (up to
  // chunk_size at a time). The registry checks the digest when the upload completes.
  absl::Status UploadBlob(const std::string& repo, const std::string& digest, int64_t size,
                          const std::function<absl::Status(int64_t offset, int64_t n, std::string* out)>& read);
  absl::Status UploadBlob(const std::string& repo, const std::string& digest, absl::string_view data);
  // Mounts blob `digest` of repository `from` into `repo` without moving its bytes. True when mounted; false
  // when the registry declined (the caller uploads instead).
  absl::StatusOr<bool> MountBlob(const std::string& repo, const std::string& digest, const std::string& from);
  // Streams the blob's bytes to `sink` (following redirects); a sink error aborts the transfer and is returned.
  absl::Status GetBlob(const std::string& repo, const std::string& digest,
                       const std::function<absl::Status(absl::string_view)>& sink);
  // Removes the blob from `repo` (the registry keeps the bytes until its own garbage collection).
  absl::Status DeleteBlob(const std::string& repo, const std::string& digest);

  // --- Manifests and tags ---
  struct Manifest {
    std::string digest;  // "sha256:<hex>" of `body`, checked
    std::string body;
  };
  // GET by tag or digest. NOT_FOUND when absent; DATA_LOSS when the body does not hash to its digest.
  absl::StatusOr<Manifest> GetManifest(const std::string& repo, const std::string& reference);
  // PUTs an OCI image manifest under `tag` (moving the tag) and returns its digest.
  absl::StatusOr<std::string> PutManifest(const std::string& repo, const std::string& tag, absl::string_view body);
  // Deletes the manifest (and with it every tag pointing at it; a registry cannot delete a tag alone).
  absl::Status DeleteManifest(const std::string& repo, const std::string& digest);
  // Every tag of `repo`, sorted; empty when the registry does not know the repository.
  absl::StatusOr<std::vector<std::string>> ListTags(const std::string& repo);
  // Every repository of the registry (GET /v2/_catalog, all pages), sorted.
  absl::StatusOr<std::vector<std::string>> Catalog();

 private:
  struct Request;
  struct Response;
  explicit RegistryClient(const RegistryClientOptions& options);

  // Sends one request. Transport failures are UNAVAILABLE; HTTP errors come back in the response.
  absl::StatusOr<Response> Send(const Request& request);
  // Send, then the status for an HTTP answer other than `ok_code` (see the mapping above).
  absl::StatusOr<Response> SendExpecting(const Request& request, long ok_code);
  // Absolute URL for a path or for a Location header (which may be relative).
  std::string Resolve(absl::string_view location) const;
  // Follows rel="next" Link headers from `path`, collecting the JSON array `field` of every page.
  absl::StatusOr<std::vector<std::string>> GetAllPages(const std::string& path, const char* field);

  void* AcquireHandle();
  void ReleaseHandle(void* handle);

  const RegistryClientOptions options_;
  absl::Mutex mu_;
  std::vector<void*> idle_handles_ ABSL_GUARDED_BY(mu_);  // CURL*
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_REGISTRY_CLIENT_H_
