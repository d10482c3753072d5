#include "client/loadgen/metrics_scrape.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cmath>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace deltaserve {
namespace loadgen {
namespace {

// The metric name of a series: up to '{'.
absl::string_view NameOf(absl::string_view series) { return series.substr(0, series.find('{')); }

}  // namespace

absl::StatusOr<std::map<std::string, double>> ParsePrometheusText(absl::string_view text) {
  std::map<std::string, double> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    // The series ends at the last '}' when there are labels (label values may hold spaces), else at a space.
    size_t series_end;
    const size_t brace = line.find('{');
    const size_t space = line.find(' ');
    if (brace != absl::string_view::npos && (space == absl::string_view::npos || brace < space)) {
      const size_t close = line.rfind('}');
      if (close == absl::string_view::npos) {
        return absl::InvalidArgumentError(absl::StrCat("metrics line ", line_no, ": unclosed labels"));
      }
      series_end = close + 1;
    } else {
      series_end = space;
    }
    if (series_end == absl::string_view::npos || series_end >= line.size()) {
      return absl::InvalidArgumentError(absl::StrCat("metrics line ", line_no, ": no value: ", std::string(line)));
    }
    absl::string_view rest = absl::StripAsciiWhitespace(line.substr(series_end));
    absl::string_view value_text = rest.substr(0, rest.find(' '));
    double value = 0;
    if (value_text == "+Inf") {
      value = HUGE_VAL;
    } else if (value_text == "-Inf") {
      value = -HUGE_VAL;
    } else if (value_text == "NaN") {
      value = NAN;
    } else if (!absl::SimpleAtod(value_text, &value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics line ", line_no, ": bad value \"", std::string(value_text), "\""));
    }
    out[std::string(line.substr(0, series_end))] = value;
  }
  return out;
}

double SumMetric(const std::map<std::string, double>& samples, const std::string& name) {
  double sum = 0;
  for (auto it = samples.lower_bound(name); it != samples.end() && absl::StartsWith(it->first, name); ++it) {
    if (NameOf(it->first) == name) sum += it->second;
  }
  return sum;
}

double SumMetricWithLabel(const std::map<std::string, double>& samples, const std::string& name,
                          const std::string& label_pair) {
  double sum = 0;
  for (auto it = samples.lower_bound(name); it != samples.end() && absl::StartsWith(it->first, name); ++it) {
    if (NameOf(it->first) == name && absl::StrContains(it->first, label_pair)) sum += it->second;
  }
  return sum;
}

absl::StatusOr<std::map<std::string, double>> ScrapeMetrics(const std::string& host_port, absl::Duration timeout) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address \"", host_port, "\" is not host:port"));
  }
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot resolve metrics address ", host_port));
  }
  const int fd = ::socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(absl::ToInt64Seconds(timeout));
  tv.tv_usec = static_cast<suseconds_t>(absl::ToInt64Microseconds(timeout) % 1000000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  const bool connected = fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  freeaddrinfo(res);
  if (!connected) {
    if (fd >= 0) ::close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to the metrics endpoint ", host_port));
  }
  const std::string request = absl::StrCat("GET /metrics HTTP/1.0\r\nHost: ", host, "\r\nConnection: close\r\n\r\n");
  std::string response;
  bool ok = ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size());
  std::vector<char> buffer(1 << 16);
  while (ok) {
    const ssize_t n = ::recv(fd, buffer.data(), buffer.size(), 0);
    if (n < 0) ok = false;
    if (n <= 0) break;
    response.append(buffer.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  if (!ok) return absl::UnavailableError(absl::StrCat("reading the metrics endpoint ", host_port, " failed"));
  const size_t body = response.find("\r\n\r\n");
  if (!absl::StartsWith(response, "HTTP/1.") || response.find(" 200") > response.find("\r\n") ||
      body == std::string::npos) {
    return absl::UnavailableError(absl::StrCat("the metrics endpoint ", host_port, " answered: ",
                                               response.substr(0, response.find("\r\n"))));
  }
  return ParsePrometheusText(absl::string_view(response).substr(body + 4));
}

}  // namespace loadgen
}  // namespace deltaserve
