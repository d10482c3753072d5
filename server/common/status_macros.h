// Status helpers shared by every component.
//
// DS_RETURN_IF_ERROR(expr): returns the absl::Status of `expr` from the enclosing function when it is not OK.
// DS_ASSIGN_OR_RETURN(lhs, expr): evaluates an absl::StatusOr<T> expression; on error returns its status,
//   otherwise moves the value into `lhs` (which may be a declaration, e.g. `auto x`).
//
// Header-only, no state: thread-safe.
#ifndef DELTASERVE_SERVER_COMMON_STATUS_MACROS_H_
#define DELTASERVE_SERVER_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DS_STATUS_CONCAT_INNER_(a, b) a##b
#define DS_STATUS_CONCAT_(a, b) DS_STATUS_CONCAT_INNER_(a, b)

#define DS_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::absl::Status ds_status_ = (expr);           \
    if (!ds_status_.ok()) return ds_status_;      \
  } while (0)

#define DS_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#define DS_ASSIGN_OR_RETURN(lhs, expr) \
  DS_ASSIGN_OR_RETURN_IMPL_(DS_STATUS_CONCAT_(ds_statusor_, __LINE__), lhs, expr)

#endif  // DELTASERVE_SERVER_COMMON_STATUS_MACROS_H_
