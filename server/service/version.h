// Version facts of the running binary. Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_SERVICE_VERSION_H_
#define DELTASERVE_SERVER_SERVICE_VERSION_H_

#include <string>

namespace deltaserve {

inline constexpr char kDeltaserveVersion[] = "0.1.0";

// The LibTorch version the binary runs on, e.g. "1.13.1".
std::string TorchVersion();

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_VERSION_H_
