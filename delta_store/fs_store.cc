// FileSystemStore (fs_store.h): blobs are files named by their digest; references are a RefTable rebuilt on open
// from a checksummed, fsync'ed journal of RefOps. docs/STORE.md describes the layout and what survives a crash.
#include "delta_store/fs_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

// A journal line is "<checksum> <EncodeRefOp json>\n"; the checksum is the first 16 hex digits of the json's
// sha256.
constexpr size_t kChecksumLength = 16;

// A failed system call on `path`, with errno's text and a code that says what kind of trouble it is.
absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  const std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(message);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(absl::StrCat(message, "; free some disk space"));
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CheckDigest(const std::string& digest) {
  if (IsSha256Digest(digest)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("\"", digest.substr(0, 80), "\" is not a valid digest: write sha256: and 64 lowercase hex digits"));
}

bool IsLowerHex(absl::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError("cannot write", path, errno);
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::Status SyncFd(int fd, const std::string& path) {
  if (::fsync(fd) != 0) return ErrnoError("cannot flush", path, errno);
  return absl::OkStatus();
}

// fsyncs a directory, making the entries created, renamed or removed in it durable.
absl::Status SyncDir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open directory", path, errno);
  absl::Status status = SyncFd(fd, path);
  ::close(fd);
  return status;
}

// Creates directory `path` when it is missing; a new one is made durable by syncing `parent` (when `sync`).
absl::Status EnsureDir(const std::string& path, const std::string& parent, bool sync) {
  if (::mkdir(path.c_str(), 0755) == 0) return sync ? SyncDir(parent) : absl::OkStatus();
  if (errno != EEXIST) return ErrnoError("cannot create directory", path, errno);
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(path, " exists but is not a directory; move it away"));
}

// The entries of a directory, without "." and "..". NOT_FOUND when it is missing or not a directory.
absl::StatusOr<std::vector<std::string>> ListDir(const std::string& path) {
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) {
    if (errno == ENOTDIR) return absl::NotFoundError(absl::StrCat(path, " is not a directory"));
    return ErrnoError("cannot list", path, errno);
  }
  std::vector<std::string> names;
  while (const struct dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  return names;
}

std::string JournalChecksum(absl::string_view json) {
  return Sha256Digest(json).substr(sizeof("sha256:") - 1, kChecksumLength);
}

std::string JournalLine(const RefOp& op) {
  const std::string json = EncodeRefOp(op);
  return absl::StrCat(JournalChecksum(json), " ", json, "\n");
}

// The op of one journal line (without its newline); INVALID_ARGUMENT saying what is wrong with it.
absl::StatusOr<RefOp> ParseJournalLine(absl::string_view line) {
  if (line.size() <= kChecksumLength + 1 || line[kChecksumLength] != ' ') {
    return absl::InvalidArgumentError("it does not start with a checksum");
  }
  const absl::string_view json = line.substr(kChecksumLength + 1);
  if (line.substr(0, kChecksumLength) != JournalChecksum(json)) {
    return absl::InvalidArgumentError("its checksum does not match its text");
  }
  return DecodeRefOp(json);
}

// The blob half of the store: the files under blobs/ and tmp/, and what this process knows about them (uploads in
// progress, recent commits, verified and corrupt blobs). Shared by the store and the writers and readers it hands
// out, so that any of them may outlive the others. Thread-safe.
class BlobFiles {
 public:
  BlobFiles(const std::string& root, const FileSystemStoreOptions& options)
      : options_(options), sha256_dir_(root + "/blobs/sha256"), temp_dir_(root + "/tmp") {}

  const FileSystemStoreOptions& options() const { return options_; }

  // REQUIRES: IsSha256Digest(digest). Path names come only from validated digests.
  std::string DirFor(const std::string& digest) const { return absl::StrCat(sha256_dir_, "/", digest.substr(7, 2)); }
  std::string PathFor(const std::string& digest) const { return absl::StrCat(DirFor(digest), "/", digest.substr(9)); }

  // NOT_FOUND when the blob is absent. REQUIRES: IsSha256Digest(digest).
  absl::StatusOr<BlobInfo> Stat(const std::string& digest) const {
    const std::string path = PathFor(digest);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("blob ", digest, " is not in the store"));
      return ErrnoError("cannot stat blob", path, errno);
    }
    if (!S_ISREG(st.st_mode)) {
      return absl::DataLossError(
          absl::StrCat(path, " is not a regular file; remove it so that the blob can be pushed again"));
    }
    BlobInfo info;
    info.digest = digest;
    info.size = st.st_size;
    info.created = absl::TimeFromTimespec(st.st_mtim);
    return info;
  }

  // Every blob file whose path is a well-formed digest, ordered by digest. Anything else under blobs/ is ignored.
  absl::StatusOr<std::vector<BlobInfo>> List() const {
    std::vector<BlobInfo> blobs;
    DS_ASSIGN_OR_RETURN(std::vector<std::string> prefixes, ListDir(sha256_dir_));
    for (const std::string& prefix : prefixes) {
      if (prefix.size() != 2 || !IsLowerHex(prefix)) continue;
      absl::StatusOr<std::vector<std::string>> names = ListDir(absl::StrCat(sha256_dir_, "/", prefix));
      if (absl::IsNotFound(names.status())) continue;
      if (!names.ok()) return names.status();
      for (const std::string& name : *names) {
        const std::string digest = absl::StrCat("sha256:", prefix, name);
        if (!IsSha256Digest(digest)) continue;
        absl::StatusOr<BlobInfo> info = Stat(digest);
        if (info.ok()) blobs.push_back(std::move(*info));  // else: removed meanwhile, or not a file
      }
    }
    std::sort(blobs.begin(), blobs.end(), [](const BlobInfo& a, const BlobInfo& b) { return a.digest < b.digest; });
    return blobs;
  }

  // Creates the temp file of a new upload; returns its descriptor and path. GC keeps the file until the upload
  // ends (Publish or Discard).
  absl::StatusOr<std::pair<int, std::string>> BeginUpload() {
    std::string path = temp_dir_ + "/upload.XXXXXX";
    absl::MutexLock lock(&mu_);
    const int fd = ::mkostemp(path.data(), O_CLOEXEC);
    if (fd < 0) return ErrnoError("cannot create an upload file in", temp_dir_, errno);
    uploads_.insert(path);
    return std::make_pair(fd, path);
  }

  // Ends an upload that did not commit: its temp file is removed.
  void Discard(const std::string& temp_path) {
    absl::MutexLock lock(&mu_);
    ::unlink(temp_path.c_str());
    uploads_.erase(temp_path);
  }

  // Ends an upload by making its complete, fsync'ed temp file blob `digest` of `size` bytes: renamed into place, or
  // dropped when that blob is already stored intact; either way the blob's directory entry is durable on return.
  // The temp file is gone afterwards, also on error.
  absl::StatusOr<BlobInfo> Publish(const std::string& temp_path, const std::string& digest, int64_t size) {
    const std::string dir = DirFor(digest);
    const std::string path = PathFor(digest);
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      // Under the lock: a concurrent Publish into a new <2 hex> directory waits until its creation is durable.
      status = EnsureDir(dir, sha256_dir_, options_.sync);
      uploads_.erase(temp_path);
      struct stat st;
      const bool stored =
          ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size == size && corrupt_.count(digest) == 0;
      if (!status.ok() || stored) {
        ::unlink(temp_path.c_str());
      } else if (::rename(temp_path.c_str(), path.c_str()) != 0) {
        status = ErrnoError(absl::StrCat("cannot move ", temp_path, " to"), path, errno);
        ::unlink(temp_path.c_str());
      } else {
        corrupt_.erase(digest);  // a corrupt copy (detected by a read, or of the wrong size) was replaced
        verified_.erase(digest);
      }
      if (status.ok()) last_commit_[digest] = absl::Now();
    }
    DS_RETURN_IF_ERROR(status);
    if (options_.sync) DS_RETURN_IF_ERROR(SyncDir(dir));
    return Stat(digest);
  }

  // Whether a new reader of `digest` verifies it: always with verify_every_read, else until one read has.
  bool NeedsVerify(const std::string& digest) {
    if (options_.verify_every_read) return true;
    absl::MutexLock lock(&mu_);
    return verified_.count(digest) == 0;
  }
  void RecordVerify(const std::string& digest, bool intact) {
    absl::MutexLock lock(&mu_);
    if (intact) {
      verified_.insert(digest);
      corrupt_.erase(digest);
    } else {
      verified_.erase(digest);
      corrupt_.insert(digest);
    }
  }

  // Removes blob `digest` and returns its size, unless it was written or committed at or after `keep_since`
  // (then returns -1). NOT_FOUND when it is absent.
  absl::StatusOr<int64_t> Remove(const std::string& digest, absl::Time keep_since) {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(BlobInfo info, Stat(digest));
    auto commit = last_commit_.find(digest);
    if (info.created >= keep_since || (commit != last_commit_.end() && commit->second >= keep_since)) return -1;
    const std::string path = PathFor(digest);
    if (::unlink(path.c_str()) != 0) return ErrnoError("cannot remove blob", path, errno);
    last_commit_.erase(digest);
    verified_.erase(digest);
    corrupt_.erase(digest);
    return info.size;
  }

  // Removes the temp files last modified before `cutoff` that no upload in progress owns; returns how many.
  absl::StatusOr<int64_t> RemoveStaleTemps(absl::Time cutoff) {
    DS_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(temp_dir_));
    int64_t removed = 0;
    for (const std::string& name : names) {
      const std::string path = absl::StrCat(temp_dir_, "/", name);
      absl::MutexLock lock(&mu_);
      struct stat st;
      if (uploads_.count(path) > 0 || ::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      if (absl::TimeFromTimespec(st.st_mtim) >= cutoff) continue;
      if (::unlink(path.c_str()) != 0) return ErrnoError("cannot remove stale upload file", path, errno);
      ++removed;
    }
    return removed;
  }

 private:
  const FileSystemStoreOptions options_;
  const std::string sha256_dir_;  // <root>/blobs/sha256
  const std::string temp_dir_;    // <root>/tmp

  absl::Mutex mu_;
  // Temp files of uploads in progress (GC leaves them alone).
  std::set<std::string> uploads_ ABSL_GUARDED_BY(mu_);
  // When a Commit last returned each blob: GC's grace period counts from there too, so that re-pushing an old
  // unreferenced blob protects it until its version is added.
  std::map<std::string, absl::Time> last_commit_ ABSL_GUARDED_BY(mu_);
  // Blobs a read has verified since open, and blobs a read found corrupt (a new upload replaces those).
  std::set<std::string> verified_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> corrupt_ ABSL_GUARDED_BY(mu_);
};

class FsBlobWriter : public BlobWriter {
 public:
  FsBlobWriter(std::shared_ptr<BlobFiles> files, std::string expected_digest, int fd, std::string temp_path)
      : files_(std::move(files)), expected_(std::move(expected_digest)), fd_(fd), temp_path_(std::move(temp_path)) {}

  ~FsBlobWriter() override { Abandon(); }

  absl::Status Append(absl::string_view data) override {
    DS_RETURN_IF_ERROR(CheckWritable());
    const int64_t limit = files_->options().max_blob_bytes;
    if (static_cast<int64_t>(data.size()) > limit - size_) {
      return Fail(absl::ResourceExhaustedError(
          absl::StrCat("the blob is larger than the store's limit of ", limit,
                       " bytes (max_blob_bytes); nothing was stored: raise the limit or push a smaller pack")));
    }
    absl::Status written = WriteAll(fd_, data, temp_path_);
    if (!written.ok()) return Fail(written);
    hasher_.Update(data);
    size_ += static_cast<int64_t>(data.size());
    return absl::OkStatus();
  }

  absl::StatusOr<BlobInfo> Commit() override {
    DS_RETURN_IF_ERROR(CheckWritable());
    committed_ = true;
    absl::Status synced = files_->options().sync ? SyncFd(fd_, temp_path_) : absl::OkStatus();
    ::close(fd_);
    fd_ = -1;
    if (!synced.ok()) return Fail(synced);
    const std::string digest = hasher_.Finish();
    if (!expected_.empty() && digest != expected_) {
      return Fail(absl::DataLossError(absl::StrCat("the uploaded bytes hash to ", digest, ", not to the expected ",
                                                   expected_, "; nothing was stored: upload the pack again")));
    }
    temp_owned_ = false;  // Publish consumes the temp file, also when it fails
    return files_->Publish(temp_path_, digest, size_);
  }

 private:
  absl::Status CheckWritable() const {
    if (committed_) {
      return absl::FailedPreconditionError("this blob upload was already committed; start a new one to write more");
    }
    if (!error_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("this blob upload failed earlier (", error_.message(), "); start a new one"));
    }
    return absl::OkStatus();
  }

  // Ends the upload on `error`: its temp file is removed and later calls fail.
  absl::Status Fail(absl::Status error) {
    Abandon();
    error_ = error;
    return error;
  }

  void Abandon() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (temp_owned_) files_->Discard(temp_path_);
    temp_owned_ = false;
  }

  const std::shared_ptr<BlobFiles> files_;
  const std::string expected_;
  int fd_;
  const std::string temp_path_;
  bool temp_owned_ = true;
  Sha256Hasher hasher_;
  int64_t size_ = 0;
  bool committed_ = false;
  absl::Status error_;
};

class FsBlobReader : public BlobReader {
 public:
  FsBlobReader(std::shared_ptr<BlobFiles> files, std::string digest, int fd, int64_t size, bool verify)
      : files_(std::move(files)), digest_(std::move(digest)), fd_(fd), size_(size), verify_(verify) {}
  ~FsBlobReader() override { ::close(fd_); }

  int64_t size() const override { return size_; }

  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    DS_RETURN_IF_ERROR(error_);
    if (at_end_) return 0;
    const size_t want = static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(n), size_ - offset_));
    size_t got = 0;
    while (got < want) {
      const ssize_t r = ::read(fd_, buffer + got, want - got);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return ErrnoError("cannot read blob", files_->PathFor(digest_), errno);
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    if (got < want) return Corrupt("it is shorter than when it was opened");
    if (verify_) hasher_.Update(absl::string_view(buffer, got));
    offset_ += static_cast<int64_t>(got);
    if (offset_ == size_) {
      at_end_ = true;
      if (verify_) {
        const bool intact = hasher_.Finish() == digest_;
        files_->RecordVerify(digest_, intact);
        if (!intact) return Corrupt("its bytes no longer hash to its digest");
      }
    }
    return got;
  }

 private:
  absl::Status Corrupt(absl::string_view why) {
    error_ =
        absl::DataLossError(absl::StrCat("blob ", digest_, " is corrupt on disk (", why, ": ", files_->PathFor(digest_),
                                         "); it is not served: push the pack again to repair it"));
    return error_;
  }

  const std::shared_ptr<BlobFiles> files_;
  const std::string digest_;
  const int fd_;
  const int64_t size_;
  const bool verify_;
  Sha256Hasher hasher_;
  int64_t offset_ = 0;
  bool at_end_ = false;
  absl::Status error_;
};

class FileSystemStore : public DeltaStore {
 public:
  FileSystemStore(const std::string& root, const FileSystemStoreOptions& options, int lock_fd)
      : options_(options),
        refs_dir_(root + "/refs"),
        journal_path_(root + "/refs/journal"),
        files_(std::make_shared<BlobFiles>(root, options)),
        lock_fd_(lock_fd) {}

  ~FileSystemStore() override {
    if (journal_fd_ >= 0) ::close(journal_fd_);
    ::close(lock_fd_);  // releases the flock
  }

  // Replays the journal (dropping a torn last line), then rewrites it compacted and opens it for appending.
  absl::Status Recover() {
    absl::MutexLock lock(&mu_);
    std::string text;
    if (FileExists(journal_path_)) {
      DS_ASSIGN_OR_RETURN(text, ReadFileToString(journal_path_));
    }
    std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
    lines.pop_back();  // "" after the final newline, or a line cut short by a crash (torn below)
    const bool torn_tail = !text.empty() && text.back() != '\n';
    for (size_t i = 0; i < lines.size(); ++i) {
      absl::StatusOr<RefOp> op = ParseJournalLine(lines[i]);
      if (!op.ok() && i + 1 == lines.size() && !torn_tail) {
        DS_LOG(WARNING) << "dropping the last line of " << journal_path_ << " (" << op.status().message()
                        << "): a write that a crash cut short; it was never acknowledged";
        break;
      }
      absl::Status applied = op.ok() ? table_.Apply(*op) : op.status();
      if (!applied.ok()) {
        return absl::DataLossError(absl::StrCat(
            "the reference journal ", journal_path_, " is corrupt at line ", i + 1, " of ", lines.size(), " (",
            applied.message(), "); refusing to guess which references survive: restore it from a backup"));
      }
    }
    if (torn_tail) {
      DS_LOG(WARNING) << "dropping an incomplete last line of " << journal_path_
                      << ": a write that a crash cut short; it was never acknowledged";
    }
    return Compact();
  }

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) override {
    if (!expected_digest.empty()) DS_RETURN_IF_ERROR(CheckDigest(expected_digest));
    DS_ASSIGN_OR_RETURN(auto upload, files_->BeginUpload());
    return std::unique_ptr<BlobWriter>(new FsBlobWriter(files_, expected_digest, upload.first, upload.second));
  }

  absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    const std::string path = files_->PathFor(digest);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("blob ", digest, " is not in the store"));
      return ErrnoError("cannot open blob", path, errno);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return absl::DataLossError(absl::StrCat(path, " is not a readable regular file; remove it"));
    }
    return std::unique_ptr<BlobReader>(new FsBlobReader(files_, digest, fd, st.st_size, files_->NeedsVerify(digest)));
  }

  absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    return files_->Stat(digest);
  }

  absl::StatusOr<std::vector<BlobInfo>> ListBlobs() override { return files_->List(); }

  absl::Status DeleteBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    if (table_.IsReferenced(digest)) {
      Ref ref;
      ref.digest = digest;
      absl::StatusOr<VersionInfo> user = table_.Resolve(ref);
      Ref named;
      if (user.ok()) named = Ref{user->tenant, user->task, user->version, "", ""};
      return absl::FailedPreconditionError(absl::StrCat("blob ", digest, " is still used by ",
                                                        user.ok() ? FormatRef(named) : "a version",
                                                        "; delete the versions that use it first"));
    }
    return files_->Remove(digest, absl::InfiniteFuture()).status();
  }

  absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                         const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckName("tenant", tenant));
    DS_RETURN_IF_ERROR(CheckName("task", task));
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);  // also keeps GC from removing the blob between this check and the journal line
    absl::StatusOr<BlobInfo> blob = files_->Stat(digest);
    if (absl::IsNotFound(blob.status())) {
      return absl::NotFoundError(
          absl::StrCat("blob ", digest, " is not in the store; upload the pack before adding a version for it"));
    }
    if (!blob.ok()) return blob.status();
    VersionInfo existing;
    DS_ASSIGN_OR_RETURN(std::optional<RefOp> op, table_.PlanAddVersion(tenant, task, digest, blob->size, absl::Now(),
                                                                       options_.quotas, &existing));
    if (!op.has_value()) return existing;
    DS_RETURN_IF_ERROR(Persist(*op));
    Ref ref;
    ref.tenant = tenant;
    ref.task = task;
    ref.version = op->version;
    return table_.Resolve(ref);
  }

  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) override {
    if (ref.tenant.empty() && ref.task.empty() && !ref.digest.empty()) {  // a digest alone names a blob
      DS_RETURN_IF_ERROR(CheckDigest(ref.digest));
      if (ref.version != 0 || !ref.label.empty()) {
        return absl::InvalidArgumentError("a reference names a version, a label or a digest, not several");
      }
      DS_ASSIGN_OR_RETURN(BlobInfo blob, files_->Stat(ref.digest));
      VersionInfo info;
      info.digest = blob.digest;
      info.size = blob.size;
      info.created = blob.created;
      return info;
    }
    absl::ReaderMutexLock lock(&mu_);
    return table_.Resolve(ref);
  }

  absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        int64_t version) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, table_.PlanSetLabel(tenant, task, label, version, absl::Now()));
    return Persist(op);
  }

  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, table_.PlanDeleteLabel(tenant, task, label, absl::Now()));
    return Persist(op);
  }

  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, table_.PlanDeleteVersion(tenant, task, version, absl::Now()));
    return Persist(op);
  }

  absl::StatusOr<ListPage> List(const ListOptions& options) override {
    absl::ReaderMutexLock lock(&mu_);
    return table_.List(options);
  }

  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) override {
    absl::ReaderMutexLock lock(&mu_);
    return table_.Usage(tenant);
  }

  absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) override {
    const absl::Time now = options.now == absl::InfiniteFuture() ? absl::Now() : options.now;
    const absl::Time cutoff = now - options.grace;
    GcReport report;
    DS_ASSIGN_OR_RETURN(report.temp_files_removed, files_->RemoveStaleTemps(cutoff));
    DS_ASSIGN_OR_RETURN(std::vector<BlobInfo> blobs, files_->List());
    for (const BlobInfo& blob : blobs) {
      if (blob.created >= cutoff) continue;
      absl::MutexLock lock(&mu_);  // AddVersion cannot reference it while we decide
      if (table_.IsReferenced(blob.digest)) continue;
      absl::StatusOr<int64_t> removed = files_->Remove(blob.digest, cutoff);
      if (absl::IsNotFound(removed.status())) continue;
      if (!removed.ok()) return removed.status();
      if (*removed < 0) continue;
      ++report.blobs_removed;
      report.bytes_removed += *removed;
    }
    return report;
  }

 private:
  // Makes `op` durable (one journal line, fsync'ed), then applies it. After a failed append the line is cut off
  // again; when even that fails the store refuses further mutations until it is reopened (and recovers).
  absl::Status Persist(const RefOp& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    DS_RETURN_IF_ERROR(journal_error_);
    const std::string line = JournalLine(op);
    absl::Status status = WriteAll(journal_fd_, line, journal_path_);
    if (status.ok() && options_.sync) status = SyncFd(journal_fd_, journal_path_);
    if (!status.ok()) {
      if (::ftruncate(journal_fd_, journal_size_) != 0 || (options_.sync && ::fsync(journal_fd_) != 0)) {
        journal_error_ = absl::FailedPreconditionError(
            absl::StrCat("the reference journal ", journal_path_, " could not be repaired after a failed write (",
                         status.message(), "); reopen the store to recover it"));
      }
      return status;
    }
    journal_size_ += static_cast<int64_t>(line.size());
    absl::Status applied = table_.Apply(op);
    if (!applied.ok()) {
      journal_error_ = absl::InternalError(
          absl::StrCat("a journaled reference change did not apply (", applied.message(), "); reopen the store"));
      return journal_error_;
    }
    return absl::OkStatus();
  }

  // Rewrites the journal as the ops that rebuild the current table: temp file, fsync, rename, directory fsync.
  absl::Status Compact() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::string text;
    for (const RefOp& op : table_.Snapshot()) text += JournalLine(op);
    const std::string temp_path = journal_path_ + ".tmp";
    const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoError("cannot write", temp_path, errno);
    absl::Status status = WriteAll(fd, text, temp_path);
    if (status.ok() && options_.sync) status = SyncFd(fd, temp_path);
    ::close(fd);
    if (status.ok() && ::rename(temp_path.c_str(), journal_path_.c_str()) != 0) {
      status = ErrnoError(absl::StrCat("cannot move ", temp_path, " to"), journal_path_, errno);
    }
    if (!status.ok()) {
      ::unlink(temp_path.c_str());
      return status;
    }
    if (options_.sync) DS_RETURN_IF_ERROR(SyncDir(refs_dir_));
    journal_fd_ = ::open(journal_path_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (journal_fd_ < 0) return ErrnoError("cannot open", journal_path_, errno);
    journal_size_ = static_cast<int64_t>(text.size());
    return absl::OkStatus();
  }

  const FileSystemStoreOptions options_;
  const std::string refs_dir_;
  const std::string journal_path_;
  const std::shared_ptr<BlobFiles> files_;
  const int lock_fd_;

  // Serializes reference mutations (plan, journal, apply) and GC's decisions against them.
  absl::Mutex mu_;
  RefTable table_ ABSL_GUARDED_BY(mu_);
  int journal_fd_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t journal_size_ ABSL_GUARDED_BY(mu_) = 0;  // bytes of whole, acknowledged lines
  absl::Status journal_error_ ABSL_GUARDED_BY(mu_);
};

// Takes the root's LOCK: one open store per root.
absl::StatusOr<int> LockRoot(const std::string& root) {
  const std::string path = root + "/LOCK";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the store at ", root, " is already open (", path,
          " is locked by another process, or by another store in this one); stop that server or use another "
          "directory"));
    }
    return ErrnoError("cannot lock", path, err);
  }
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeltaStore>> OpenFileSystemStore(const std::string& root,
                                                                const FileSystemStoreOptions& options) {
  if (root.empty()) return absl::InvalidArgumentError("the store directory is empty; pass a directory path");
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) {
    if (errno != ENOENT) return ErrnoError("cannot open store directory", root, errno);
    if (!options.create_if_missing) {
      return absl::NotFoundError(absl::StrCat("store directory ", root, " does not exist; create it first"));
    }
    std::error_code error;
    std::filesystem::create_directories(root, error);
    if (error) return absl::PermissionDeniedError(absl::StrCat("cannot create ", root, ": ", error.message()));
  } else if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("store directory ", root, " is not a directory"));
  }
  for (const char* dir : {"/blobs", "/blobs/sha256", "/tmp", "/refs"}) {
    const std::string path = root + dir;
    DS_RETURN_IF_ERROR(EnsureDir(path, path.substr(0, path.rfind('/')), options.sync));
  }
  DS_ASSIGN_OR_RETURN(int lock_fd, LockRoot(root));
  auto store = std::make_unique<FileSystemStore>(root, options, lock_fd);
  DS_RETURN_IF_ERROR(store->Recover());
  return std::unique_ptr<DeltaStore>(std::move(store));
}

}  // namespace store
}  // namespace deltaserve
