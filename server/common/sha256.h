// SHA-256 digests (OpenSSL's libcrypto), as "sha256:<64 lowercase hex>" strings: the identity of model weights
// (backbone fingerprints) and of delta packs (content addresses).
//
// Stateless functions: thread-safe.
#ifndef DELTASERVE_SERVER_COMMON_SHA256_H_
#define DELTASERVE_SERVER_COMMON_SHA256_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace deltaserve {

// "sha256:<hex>" of `data`.
std::string Sha256Digest(absl::string_view data);

// "sha256:<hex>" of a file's bytes, read in chunks. NOT_FOUND when it cannot be opened.
absl::StatusOr<std::string> FileSha256Digest(const std::string& path);

// Incremental SHA-256 over data that arrives in pieces (a streamed upload). Not thread-safe; one per stream.
class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;
  void Update(absl::string_view data);
  // "sha256:<hex>" of everything passed to Update. REQUIRES: called once.
  std::string Finish();

 private:
  void* ctx_;  // EVP_MD_CTX*
};

// True when `digest` is "sha256:" followed by exactly 64 lowercase hex digits.
bool IsSha256Digest(absl::string_view digest);

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_SHA256_H_
