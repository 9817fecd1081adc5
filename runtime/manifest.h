/* GitOps manifests: one JSON object per target, read from a git blob and
 * checked field by field. What a manifest may say:
 *   target   (string, required): a configured target
 *   version  (string, required): a valid version
 *   strategy (object, optional): {"kind": "canary" | "blue-green" | a name
 *            registered with the manager, ...parameters, "webhooks": [...]}
 *            (webhooks are checked here, by webhook.c, as written in git:
 *            a secret only as "${NAME}", no ${NAME} in a URL)
 *   metadata (object, optional): stored with the deployment ("gitops" is
 *            reserved), at most MANIFEST_METADATA_MAX bytes encoded
 * Anything else is refused, each error naming the file and the field. The
 * checks that need the configuration (is this a target? is this strategy
 * known and are its parameters valid?) are callbacks: the runtime knows
 * neither the configuration's shape nor the strategies. */
#ifndef DEPLOY_MANIFEST_H
#define DEPLOY_MANIFEST_H

#include <stddef.h>

#include <jansson.h>

#include "gitops.h"

#define MANIFEST_METADATA_MAX (64 * 1024)

typedef struct manifest_checks {
  /* 0 when `name` is a configured target, else -1 with err (the message
   * after "field 'target': "). */
  int (*target)(void *payload, const char *name, char *err);
  /* 0 when the strategy object is valid, else -1 with err (a message
   * naming the field, e.g. "field 'strategy': CanaryStrategy has no
   * parameter 'x' (known: ...)"). */
  int (*strategy)(void *payload, const json_t *strategy, char *err);
  void *payload;
} manifest_checks;

typedef struct manifest {
  char *file;              /* repository path; heap */
  char oid[GITOPS_OID_HEX];/* the blob */
  char target[64];
  char version[129];
  json_t *strategy;        /* NULL: the manager's default */
  json_t *metadata;        /* NULL or an object */
  char **errors;           /* "file: message", when invalid */
  size_t nerrors;
} manifest;

/* Reads and checks one manifest entry into m (which it initialises).
 * -1 only when out of memory; an invalid manifest is 0 with errors. */
int manifest_read(manifest *m, const gitops_entry *en, const manifest_checks *c);
void manifest_clear(manifest *m);

#endif
