// `deltactl backup` and `deltactl restore`: a copy of the delta store taken through the API, so it works for
// every store backend (filesystem store, shared OCI registry) and moves a store from one backend to another.
//
//   deltactl backup --out=DIR [--tenant=T | --tenants=A,B | --tenants_file=F | --all_tenants] [--overwrite]
//   deltactl restore DIR [--tenant=T] [--dry_run]
//
// A backup directory holds blobs/sha256-<hex> (each distinct pack once, its bytes exactly as pulled) and
// manifest.json: {"format": "deltaserve-backup", "format_version": 1, "created", "server": {address,
// server_version, model, backbone_fingerprint}, "tenants": [{"tenant", "tasks": [{"task", "versions": [{version,
// digest, size_bytes, created, created_unix_micros}], "labels": {label: version}}]}], "blobs", "bytes"}.
// It is written to DIR.tmp and renamed to DIR at the end: a DIR with a manifest.json is a complete backup.
//
// Tenants: --all_tenants takes every tenant's (ListDeltas all_tenants: an admin token, or no authentication);
// otherwise backup covers the tenants named by --tenant, --tenants and the tenants file given with --tenants_file
// (together); with none of them, the caller's own tenant (the server's default tenant without authentication). Other tenants than the caller's need
// an admin token (or a server without authentication).
//
// Restore checks the manifest and every blob's sha256 before it pushes anything, then pushes each task's
// versions in ascending original order and re-applies the labels ("latest" is the store's). The store numbers
// versions itself: a task whose versions had gaps (deleted versions) gets new numbers, reported as old -> new;
// labels go on the mapped versions and digests never change. Pushing a pack a task already has returns the
// existing version, so a second restore adds nothing ("already present").
//
// Both print a JSON summary on stdout (--pretty indents it) and notes on stderr. Exit codes: 0 done, 1 an error
// (restore: any pack or label that failed, after trying all the others), 2 usage (backup: DIR exists and is not
// empty without --overwrite). Flags --out, --overwrite, --dry_run and --tenants are defined in deltactl_backup.cc;
// --tenants_file is deltactl_admin.cc's. Not thread-safe (reads flags).
#ifndef DELTASERVE_CLIENT_DELTACTL_BACKUP_H_
#define DELTASERVE_CLIENT_DELTACTL_BACKUP_H_

#include <functional>
#include <string>
#include <vector>

#include "client/client.h"
#include "nlohmann/json.hpp"

namespace deltaserve {
namespace client {

struct BackupContext {
  // --server, recorded in the manifest.
  std::string server;
  // --tenant ("" = not given).
  std::string tenant;
  // Prints a JSON result (honours --pretty).
  std::function<void(const nlohmann::json&)> print;
};

// args: what follows "backup" / "restore" on the command line. Return the process exit code.
int BackupCommand(DeltaserveClient& client, const BackupContext& ctx, const std::vector<std::string>& args);
int RestoreCommand(DeltaserveClient& client, const BackupContext& ctx, const std::vector<std::string>& args);

}  // namespace client
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_DELTACTL_BACKUP_H_
