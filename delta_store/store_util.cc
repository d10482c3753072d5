// Convenience functions over any DeltaStore (store.h).
#include <memory>
#include <string>

#include "delta_store/store.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {

absl::StatusOr<BlobInfo> PutBlob(DeltaStore& store, absl::string_view data, const std::string& expected_digest) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobWriter> writer, store.NewBlobWriter(expected_digest));
  DS_RETURN_IF_ERROR(writer->Append(data));
  return writer->Commit();
}

absl::StatusOr<std::string> ReadBlob(DeltaStore& store, const std::string& digest) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobReader> reader, store.OpenBlob(digest));
  std::string data;
  data.reserve(static_cast<size_t>(reader->size()));
  std::string buffer(64 << 10, '\0');
  while (true) {
    DS_ASSIGN_OR_RETURN(size_t n, reader->Read(buffer.data(), buffer.size()));
    if (n == 0) break;
    data.append(buffer.data(), n);
  }
  return data;
}

absl::StatusOr<VersionInfo> PushPack(DeltaStore& store, const std::string& tenant, const std::string& task,
                                     absl::string_view data) {
  DS_ASSIGN_OR_RETURN(BlobInfo blob, PutBlob(store, data));
  return store.AddVersion(tenant, task, blob.digest);
}

}  // namespace store
}  // namespace deltaserve
