// RegistryClient (registry_client.h): the OCI Distribution API over libcurl.
#include "delta_store/registry_client.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

constexpr size_t kMaxResponseBytes = size_t{32} << 20;  // manifests, tag lists, catalog pages, error bodies
constexpr size_t kMaxIdleHandles = 8;

// The registry's own explanation from an error body ({"errors":[{"code":..,"message":..}]}), or the body's start.
std::string RegistryErrorText(const std::string& body) {
  nlohmann::json j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("errors") && j["errors"].is_array() && !j["errors"].empty()) {
    std::string text;
    for (const auto& e : j["errors"]) {
      if (!e.is_object()) continue;
      if (!text.empty()) text += "; ";
      if (e.contains("code") && e["code"].is_string()) absl::StrAppend(&text, e["code"].get<std::string>());
      if (e.contains("message") && e["message"].is_string()) {
        absl::StrAppend(&text, ": ", e["message"].get<std::string>());
      }
    }
    if (!text.empty()) return text;
  }
  std::string start(absl::StripAsciiWhitespace(body.substr(0, 200)));
  return start.empty() ? "no details" : start;
}

absl::Status HttpError(absl::string_view method, const std::string& url, long code, const std::string& body) {
  std::string message = absl::StrCat("the OCI registry answered HTTP ", code, " to ", method, " ", url, " (",
                                     RegistryErrorText(body), ")");
  switch (code) {
    case 400:
      return absl::InvalidArgumentError(absl::StrCat(message, "; the registry rejected the request"));
    case 401:
      return absl::UnauthenticatedError(
          absl::StrCat(message, "; set the store's registry credentials (bearer token or user name and password)"));
    case 403:
      return absl::PermissionDeniedError(absl::StrCat(message, "; the credentials lack access to this repository"));
    case 404:
      return absl::NotFoundError(message);
    case 405:
      return absl::FailedPreconditionError(absl::StrCat(message,
                                                        "; the registry does not allow this operation (for deletes, "
                                                        "set storage.delete.enabled: true in its configuration)"));
    case 429:
      return absl::UnavailableError(absl::StrCat(message, "; the registry is rate-limiting us, retry later"));
    default:
      break;
  }
  if (code >= 500) return absl::UnavailableError(absl::StrCat(message, "; retry later, or check the registry's logs"));
  return absl::UnknownError(absl::StrCat(message, "; unexpected answer"));
}

// The target of a rel="next" Link header ("</v2/_catalog?last=a&n=100>; rel=\"next\""), or "".
std::string NextLink(const std::string& link) {
  if (!absl::StrContains(link, "rel=\"next\"")) return "";
  size_t open = link.find('<');
  size_t close = link.find('>', open);
  if (open == std::string::npos || close == std::string::npos) return "";
  return link.substr(open + 1, close - open - 1);
}

std::string WithQuery(const std::string& url, absl::string_view query) {
  return absl::StrCat(url, absl::StrContains(url, "?") ? "&" : "?", query);
}

}  // namespace

struct RegistryClient::Request {
  std::string method = "GET";
  std::string url;  // absolute
  std::vector<std::string> headers;
  bool has_body = false;  // send `body` (possibly empty) as the request body
  absl::string_view body;
  // When set, the body of a 2xx answer goes here instead of Response::body.
  const std::function<absl::Status(absl::string_view)>* sink = nullptr;
  bool follow_redirects = false;
};

struct RegistryClient::Response {
  long code = 0;
  std::map<std::string, std::string> headers;  // lower-case names, of the last answer
  std::string body;
};

absl::StatusOr<std::unique_ptr<RegistryClient>> RegistryClient::Create(const RegistryClientOptions& options) {
  static std::once_flag curl_init;
  std::call_once(curl_init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  RegistryClientOptions o = options;
  while (absl::EndsWith(o.url, "/")) o.url.pop_back();
  absl::string_view rest = o.url;
  if (!absl::ConsumePrefix(&rest, "http://") && !absl::ConsumePrefix(&rest, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "registry URL \"", options.url, "\" must start with http:// or https:// (e.g. http://127.0.0.1:5000)"));
  }
  if (rest.empty() || absl::StrContains(rest, "/")) {
    return absl::InvalidArgumentError(
        absl::StrCat("registry URL \"", options.url, "\" must be scheme://host[:port] without a path"));
  }
  if (o.chunk_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("registry chunk size ", o.chunk_size, " must be positive"));
  }
  return std::unique_ptr<RegistryClient>(new RegistryClient(o));
}

RegistryClient::RegistryClient(const RegistryClientOptions& options) : options_(options) {}

RegistryClient::~RegistryClient() {
  for (void* handle : idle_handles_) curl_easy_cleanup(static_cast<CURL*>(handle));
}

void* RegistryClient::AcquireHandle() {
  {
    absl::MutexLock lock(&mu_);
    if (!idle_handles_.empty()) {
      void* handle = idle_handles_.back();
      idle_handles_.pop_back();
      return handle;
    }
  }
  return curl_easy_init();
}

void RegistryClient::ReleaseHandle(void* handle) {
  curl_easy_reset(static_cast<CURL*>(handle));  // keeps its open connections
  absl::MutexLock lock(&mu_);
  if (idle_handles_.size() < kMaxIdleHandles) {
    idle_handles_.push_back(handle);
    return;
  }
  curl_easy_cleanup(static_cast<CURL*>(handle));
}

std::string RegistryClient::Resolve(absl::string_view location) const {
  if (absl::StartsWith(location, "http://") || absl::StartsWith(location, "https://")) return std::string(location);
  return absl::StrCat(options_.url, location);
}

namespace {

struct Transfer {
  CURL* curl = nullptr;
  const std::function<absl::Status(absl::string_view)>* sink = nullptr;
  std::map<std::string, std::string> headers;
  std::string body;
  absl::Status error;  // from the sink, or an oversized body
};

size_t OnHeader(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  absl::string_view line(data, size * count);
  if (absl::StartsWith(line, "HTTP/")) {
    t->headers.clear();  // a new answer (after a redirect or a 100 Continue)
  } else if (size_t colon = line.find(':'); colon != absl::string_view::npos) {
    t->headers[absl::AsciiStrToLower(line.substr(0, colon))] =
        std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return size * count;
}

size_t OnBody(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  absl::string_view chunk(data, size * count);
  long code = 0;
  curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &code);
  if (t->sink != nullptr && code >= 200 && code < 300) {
    t->error = (*t->sink)(chunk);
  } else if (t->body.size() + chunk.size() > kMaxResponseBytes) {
    t->error = absl::ResourceExhaustedError(
        absl::StrCat("the OCI registry's answer is larger than ", kMaxResponseBytes, " bytes; refusing it"));
  } else {
    t->body.append(chunk.data(), chunk.size());
  }
  return t->error.ok() ? chunk.size() : 0;  // 0 aborts the transfer
}

}  // namespace

absl::StatusOr<RegistryClient::Response> RegistryClient::Send(const Request& request) {
  CURL* curl = static_cast<CURL*>(AcquireHandle());
  if (curl == nullptr) return absl::InternalError("curl_easy_init failed (out of memory?)");
  Transfer transfer;
  transfer.curl = curl;
  transfer.sink = request.sink;

  curl_easy_setopt(curl, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(absl::ToInt64Milliseconds(options_.connect_timeout)));
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(options_.request_timeout)));
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &OnHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &transfer);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &OnBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &transfer);
  if (request.follow_redirects) {
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(curl, CURLOPT_MAXREDIRS, 5L);
  }
  if (request.method == "HEAD") {
    curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  } else if (request.method != "GET") {
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }
  if (request.has_body) {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request.body.empty() ? "" : request.body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  }

  curl_slist* headers = curl_slist_append(nullptr, "Expect:");  // no 100-continue round trip
  for (const std::string& h : request.headers) headers = curl_slist_append(headers, h.c_str());
  std::string auth;
  if (!options_.bearer_token.empty()) {
    auth = absl::StrCat("Authorization: Bearer ", options_.bearer_token);
    headers = curl_slist_append(headers, auth.c_str());
  } else if (!options_.username.empty()) {
    curl_easy_setopt(curl, CURLOPT_HTTPAUTH, static_cast<long>(CURLAUTH_BASIC));
    curl_easy_setopt(curl, CURLOPT_USERNAME, options_.username.c_str());
    curl_easy_setopt(curl, CURLOPT_PASSWORD, options_.password.c_str());
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);

  CURLcode rc = curl_easy_perform(curl);
  Response response;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.code);
  curl_slist_free_all(headers);
  ReleaseHandle(curl);

  if (!transfer.error.ok()) return transfer.error;
  if (rc != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat(
        "cannot reach the OCI registry at ", options_.url, " (", request.method, " ", request.url, "): ",
        curl_easy_strerror(rc), "; check that the registry is running and that the store's registry URL is right"));
  }
  response.headers = std::move(transfer.headers);
  response.body = std::move(transfer.body);
  return response;
}

absl::StatusOr<RegistryClient::Response> RegistryClient::SendExpecting(const Request& request, long ok_code) {
  DS_ASSIGN_OR_RETURN(Response response, Send(request));
  if (response.code != ok_code) return HttpError(request.method, request.url, response.code, response.body);
  return response;
}

absl::Status RegistryClient::Ping() {
  Request request;
  request.url = Resolve("/v2/");
  return SendExpecting(request, 200).status();
}

// --- Blobs ---

absl::StatusOr<int64_t> RegistryClient::HeadBlob(const std::string& repo, const std::string& digest) {
  Request request;
  request.method = "HEAD";
  request.url = Resolve(absl::StrCat("/v2/", repo, "/blobs/", digest));
  request.follow_redirects = true;
  DS_ASSIGN_OR_RETURN(Response response, SendExpecting(request, 200));
  int64_t size = 0;
  if (!absl::SimpleAtoi(response.headers["content-length"], &size)) {
    return absl::UnknownError(absl::StrCat("the OCI registry gave no Content-Length for ", request.url));
  }
  return size;
}

absl::Status RegistryClient::UploadBlob(
    const std::string& repo, const std::string& digest, int64_t size,
    const std::function<absl::Status(int64_t offset, int64_t n, std::string* out)>& read) {
  Request start;
  start.method = "POST";
  start.url = Resolve(absl::StrCat("/v2/", repo, "/blobs/uploads/"));
  start.has_body = true;
  DS_ASSIGN_OR_RETURN(Response response, SendExpecting(start, 202));
  std::string location = response.headers["location"];
  if (location.empty()) {
    return absl::UnknownError(absl::StrCat("the OCI registry gave no upload Location for POST ", start.url));
  }
  location = Resolve(location);

  std::string chunk;
  int64_t offset = 0;
  if (size > options_.chunk_size) {
    while (offset < size) {
      const int64_t n = std::min(options_.chunk_size, size - offset);
      DS_RETURN_IF_ERROR(read(offset, n, &chunk));
      Request patch;
      patch.method = "PATCH";
      patch.url = location;
      patch.headers = {"Content-Type: application/octet-stream",
                       absl::StrCat("Content-Range: ", offset, "-", offset + n - 1)};
      patch.has_body = true;
      patch.body = chunk;
      DS_ASSIGN_OR_RETURN(response, SendExpecting(patch, 202));
      if (!response.headers["location"].empty()) location = Resolve(response.headers["location"]);
      offset += n;
    }
    chunk.clear();
  } else {
    DS_RETURN_IF_ERROR(read(0, size, &chunk));
  }
  Request finish;
  finish.method = "PUT";
  finish.url = WithQuery(location, absl::StrCat("digest=", digest));
  finish.headers = {"Content-Type: application/octet-stream"};
  finish.has_body = true;
  finish.body = chunk;
  return SendExpecting(finish, 201).status();
}

absl::Status RegistryClient::UploadBlob(const std::string& repo, const std::string& digest, absl::string_view data) {
  return UploadBlob(repo, digest, static_cast<int64_t>(data.size()),
                    [data](int64_t offset, int64_t n, std::string* out) {
                      out->assign(data.data() + offset, n);
                      return absl::OkStatus();
                    });
}

absl::StatusOr<bool> RegistryClient::MountBlob(const std::string& repo, const std::string& digest,
                                               const std::string& from) {
  Request request;
  request.method = "POST";
  request.url = Resolve(absl::StrCat("/v2/", repo, "/blobs/uploads/?mount=", digest, "&from=", from));
  request.has_body = true;
  DS_ASSIGN_OR_RETURN(Response response, Send(request));
  if (response.code == 201) return true;
  if (response.code != 202) return HttpError(request.method, request.url, response.code, response.body);
  // Declined: the registry opened an ordinary upload instead; cancel it (it would expire anyway).
  if (!response.headers["location"].empty()) {
    Request cancel;
    cancel.method = "DELETE";
    cancel.url = Resolve(response.headers["location"]);
    Send(cancel).IgnoreError();
  }
  return false;
}

absl::Status RegistryClient::GetBlob(const std::string& repo, const std::string& digest,
                                     const std::function<absl::Status(absl::string_view)>& sink) {
  Request request;
  request.url = Resolve(absl::StrCat("/v2/", repo, "/blobs/", digest));
  request.sink = &sink;
  request.follow_redirects = true;
  return SendExpecting(request, 200).status();
}

absl::Status RegistryClient::DeleteBlob(const std::string& repo, const std::string& digest) {
  Request request;
  request.method = "DELETE";
  request.url = Resolve(absl::StrCat("/v2/", repo, "/blobs/", digest));
  return SendExpecting(request, 202).status();
}

// --- Manifests and tags ---

absl::StatusOr<RegistryClient::Manifest> RegistryClient::GetManifest(const std::string& repo,
                                                                     const std::string& reference) {
  Request request;
  request.url = Resolve(absl::StrCat("/v2/", repo, "/manifests/", reference));
  request.headers = {absl::StrCat("Accept: ", kOciManifestMediaType)};
  DS_ASSIGN_OR_RETURN(Response response, SendExpecting(request, 200));
  Manifest manifest;
  manifest.body = std::move(response.body);
  manifest.digest = Sha256Digest(manifest.body);
  const std::string& claimed = IsSha256Digest(reference) ? reference : response.headers["docker-content-digest"];
  if (!claimed.empty() && claimed != manifest.digest) {
    return absl::DataLossError(absl::StrCat("manifest ", request.url, " is ", manifest.digest,
                                            " but the registry calls it ", claimed,
                                            "; the registry's storage may be corrupt"));
  }
  return manifest;
}

absl::StatusOr<std::string> RegistryClient::PutManifest(const std::string& repo, const std::string& tag,
                                                        absl::string_view body) {
  Request request;
  request.method = "PUT";
  request.url = Resolve(absl::StrCat("/v2/", repo, "/manifests/", tag));
  request.headers = {absl::StrCat("Content-Type: ", kOciManifestMediaType)};
  request.has_body = true;
  request.body = body;
  // A registry that is still linking a blob another request just uploaded may call it unknown for a moment.
  for (int attempt = 1;; ++attempt) {
    DS_ASSIGN_OR_RETURN(Response response, Send(request));
    if (response.code == 201) break;
    if (attempt == 3 || response.code != 400 || !absl::StrContains(response.body, "MANIFEST_BLOB_UNKNOWN")) {
      return HttpError(request.method, request.url, response.code, response.body);
    }
    absl::SleepFor(absl::Milliseconds(100 * attempt));
  }
  return Sha256Digest(body);
}

absl::Status RegistryClient::DeleteManifest(const std::string& repo, const std::string& digest) {
  Request request;
  request.method = "DELETE";
  request.url = Resolve(absl::StrCat("/v2/", repo, "/manifests/", digest));
  return SendExpecting(request, 202).status();
}

absl::StatusOr<std::vector<std::string>> RegistryClient::GetAllPages(const std::string& path, const char* field) {
  std::vector<std::string> items;
  std::string url = Resolve(path);
  for (int page = 0; !url.empty(); ++page) {
    if (page == 100000) return absl::UnknownError(absl::StrCat("the OCI registry's listing of ", path, " never ends"));
    Request request;
    request.url = url;
    DS_ASSIGN_OR_RETURN(Response response, SendExpecting(request, 200));
    nlohmann::json j = nlohmann::json::parse(response.body, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) {
      return absl::UnknownError(absl::StrCat("the OCI registry's answer to GET ", url, " is not a JSON object"));
    }
    auto it = j.find(field);
    if (it != j.end() && it->is_array()) {  // null when there is nothing
      for (const auto& item : *it) {
        if (item.is_string()) items.push_back(item.get<std::string>());
      }
    }
    std::string next = NextLink(response.headers["link"]);
    url = next.empty() ? "" : Resolve(next);
  }
  std::sort(items.begin(), items.end());
  items.erase(std::unique(items.begin(), items.end()), items.end());
  return items;
}

absl::StatusOr<std::vector<std::string>> RegistryClient::ListTags(const std::string& repo) {
  absl::StatusOr<std::vector<std::string>> tags = GetAllPages(absl::StrCat("/v2/", repo, "/tags/list"), "tags");
  if (absl::IsNotFound(tags.status())) return std::vector<std::string>();
  return tags;
}

absl::StatusOr<std::vector<std::string>> RegistryClient::Catalog() {
  return GetAllPages("/v2/_catalog?n=1000", "repositories");
}

}  // namespace store
}  // namespace deltaserve
