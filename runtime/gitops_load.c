/* The core's side of the git module (deploy-git.so, see module.h): the
 * gitops_* functions load it on first use and forward to it. */
#include "gitops.h"

#include "module.h"
#include "util.h"

static const gitops_api *git;

int gitops_open(gitops **out, engine *e, const gitops_opts *o, char *err) {
  *out = NULL;
  if (!git && !(git = dc_module_api("git", "deploy_git_api", GITOPS_API_VERSION, err)))
    return -1;
  return git->open(out, e, o, err);
}

/* Every other call has a handle, so the module is loaded already. */
void gitops_free(gitops *g) {
  if (g)
    git->free(g);
}
const char *gitops_url(const gitops *g) { return git->url(g); }
const char *gitops_branch(const gitops *g) { return git->branch(g); }
const char *gitops_path(const gitops *g) { return git->path(g); }
const char *gitops_cache(const gitops *g) { return git->cache(g); }
const gitops_stats *gitops_last_stats(const gitops *g) { return git->last_stats(g); }
int gitops_busy(const gitops *g) { return git->busy(g); }
void gitops_cancel(gitops *g) { git->cancel(g); }
int gitops_fetch(gitops *g, gitops_fetch_cb cb, void *payload, char *err) { return git->fetch(g, cb, payload, err); }
