// The `deltactl admin` subcommands: edit a tenants file (server/auth/tenants.h) in place — tenants, roles,
// quotas and API tokens. They need no server: a running server re-reads the file within seconds.
//
//   deltactl admin --tenants_file=F tenant add NAME [--role=admin]
//   deltactl admin --tenants_file=F tenant rm NAME
//   deltactl admin --tenants_file=F tenant ls
//   deltactl admin --tenants_file=F tenant quota NAME KEY=VALUE...   (KEY= removes an override)
//   deltactl admin --tenants_file=F token create TENANT [--description=D]   (prints the token once)
//   deltactl admin --tenants_file=F token revoke ID
//   deltactl admin --tenants_file=F token ls [TENANT]
//
// Their flags (--tenants_file, --role) are defined in deltactl_admin.cc; --description is shared with `tune
// submit` (deltactl_tune.cc). Every write replaces the file atomically (WriteTenantsFile). Two admins editing the
// same file at the same instant can lose one edit (last writer wins). Not thread-safe (reads flags).
#ifndef DELTASERVE_CLIENT_DELTACTL_ADMIN_H_
#define DELTASERVE_CLIENT_DELTACTL_ADMIN_H_

#include <string>
#include <vector>

namespace deltaserve {
namespace client {

// args: what follows "admin" on the command line. Returns the process exit code (0 ok, 1 error, 2 usage).
int AdminCommand(const std::vector<std::string>& args);

}  // namespace client
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_DELTACTL_ADMIN_H_
