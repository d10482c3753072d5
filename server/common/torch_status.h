// Turns LibTorch exceptions into absl::Status where they are raised.
//
// LibTorch reports errors by throwing c10::Error (and occasionally std::exception). No exception may cross a
// component boundary in deltaserve, so every call into LibTorch that can fail on user-influenced input is wrapped:
//
//   absl::StatusOr<at::Tensor> out = deltaserve::TorchCall([&] { return at::matmul(a, b); }, "lora matmul");
//   absl::Status st = deltaserve::TorchCallVoid([&] { t.copy_(u); }, "copy");
//
// ShapeString() formats shapes for error messages.
//
// Errors become INTERNAL (the inputs were validated before, so a throw is our bug or a resource problem), except
// std::bad_alloc, which becomes RESOURCE_EXHAUSTED. Header-only, stateless: thread-safe.
#ifndef DELTASERVE_SERVER_COMMON_TORCH_STATUS_H_
#define DELTASERVE_SERVER_COMMON_TORCH_STATUS_H_

#include <exception>
#include <new>
#include "absl/strings/string_view.h"
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "c10/util/ArrayRef.h"
#include "c10/util/Exception.h"

namespace deltaserve {

namespace internal {
inline absl::Status TorchErrorToStatus(absl::string_view what, absl::string_view message) {
  // c10::Error messages carry a long C++ backtrace after the first line; keep the first line only.
  absl::string_view first = message.substr(0, message.find('\n'));
  return absl::InternalError(absl::StrCat(what, ": ", first));
}
}  // namespace internal

// "[2,3]": a tensor shape for error messages.
inline std::string ShapeString(c10::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape.begin(), shape.end(), ","), "]");
}

template <typename F>
auto TorchCall(F&& f, absl::string_view what) -> absl::StatusOr<std::invoke_result_t<F>> {
  try {
    return f();
  } catch (const c10::Error& e) {
    return internal::TorchErrorToStatus(what, e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory"));
  } catch (const std::exception& e) {
    return internal::TorchErrorToStatus(what, e.what());
  }
}

template <typename F>
absl::Status TorchCallVoid(F&& f, absl::string_view what) {
  try {
    f();
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return internal::TorchErrorToStatus(what, e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory"));
  } catch (const std::exception& e) {
    return internal::TorchErrorToStatus(what, e.what());
  }
}

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_TORCH_STATUS_H_
