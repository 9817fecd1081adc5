/* The store's JSON columns read back (deployments.metadata and .errors,
 * events.data): by the bindings (ljson_decode in bindings/lutil.c, for
 * manager:history, manager:events and every event handed to Lua) and by
 * the GitOps plan (gitops_provenance_read in runtime/gitplan.c, which
 * looks for the revision a deployment came from). The text is a C string
 * as SQLite hands TEXT back; it may be anything: another version of
 * deployctl, or another tool, may have written it. */
#include "fuzz.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "gitops.h"
#include "lutil.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  /* One state for every input: no Lua code runs, only values are pushed. */
  L = luaL_newstate();
  if (!L)
    abort();
  return 0;
}

static size_t bounded_len(const char *s, size_t max) {
  size_t n = 0;
  while (n < max && s[n])
    n++;
  return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = fuzz_cstr(data, size);

  gitops_provenance p;
  if (gitops_provenance_read(text, &p) == 0) {
    FUZZ_CHECK(p.revision[0] != '\0');
    /* Every field terminated inside its buffer, however long the value. */
    FUZZ_CHECK(bounded_len(p.revision, sizeof p.revision) < sizeof p.revision);
    FUZZ_CHECK(bounded_len(p.blob, sizeof p.blob) < sizeof p.blob);
    FUZZ_CHECK(bounded_len(p.file, sizeof p.file) < sizeof p.file);
    FUZZ_CHECK(bounded_len(p.repo, sizeof p.repo) < sizeof p.repo);
    FUZZ_CHECK(bounded_len(p.branch, sizeof p.branch) < sizeof p.branch);
    FUZZ_CHECK(bounded_len(p.path, sizeof p.path) < sizeof p.path);
  }

  int top = lua_gettop(L);
  ljson_decode(L, text);
  FUZZ_CHECK(lua_gettop(L) == top + 1);
  lua_settop(L, top);
  /* Freed now, not at some later input: libFuzzer's leak check runs after
   * any input that allocated more than it freed, and costs far more. */
  lua_gc(L, LUA_GCCOLLECT);
  free(text);
  return 0;
}
