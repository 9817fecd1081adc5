/* Modules: the parts of the runtime that need a large library live in a
 * shared object of their own, loaded on first use, so that a command that
 * never touches git or HTTP never loads libgit2 or libcurl and the thirty
 * libraries they pull in (that loading, not their initialisation, is most
 * of a start-up):
 *   deploy-git.so    gitops.c (libgit2): fetching manifests
 *   deploy-http.so   http.c, healthcheck.c (libcurl): health checks
 * A module exports one versioned table of functions; the core forwards to
 * it (gitops_load.c, health.c). Modules are looked for in
 * $DEPLOY_MODULE_DIR, then next to the program or Lua module the core is
 * part of (the build directory, or an installed deployctl), then in the
 * directory they were installed to. A module is never unloaded: it may
 * have a thread in the pool when its users are gone. */
#ifndef DEPLOY_MODULE_H
#define DEPLOY_MODULE_H

/* The table `symbol` of module `name` ("git" -> deploy-git.so), whose first
 * member, an int, must equal version. Loaded once, cached; NULL with err
 * naming the file, the directories looked in, and the fix. */
const void *dc_module_api(const char *name, const char *symbol, int version, char *err);

#endif
