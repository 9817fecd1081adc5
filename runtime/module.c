#include "module.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#ifndef DEPLOY_MODULE_INSTALL_DIR
#define DEPLOY_MODULE_INSTALL_DIR "/usr/local/lib/deployctl"
#endif

typedef struct loaded {
  const char *name;
  const char *symbol; /* a module may export several tables */
  const void *api;
} loaded;

static loaded cache[8];
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

/* The directory of the object this code is linked into (deployctl, or the
 * Lua module deploy.so): "" when it cannot be told. */
static void own_dir(char *buf, size_t size) {
  Dl_info self;
  buf[0] = '\0';
  if (!dladdr((void *)dc_module_api, &self) || !self.dli_fname)
    return;
  const char *slash = strrchr(self.dli_fname, '/');
  if (slash)
    dc_fmt(buf, size, "%.*s", (int)(slash - self.dli_fname), self.dli_fname);
  else if (!getcwd(buf, size))
    buf[0] = '\0';
}

static void *open_in(const char *dir, const char *name, char *tried, size_t size, size_t *len) {
  char path[4200];
  if (!dir || !*dir)
    return NULL;
  dc_fmt(path, sizeof path, "%s/deploy-%s.so", dir, name);
  *len += (size_t)snprintf(tried + *len, *len < size ? size - *len : 0, "%s%s", *len ? ", " : "", dir);
  if (access(path, R_OK) != 0)
    return NULL;
  /* Local: its own copies of the helpers it links never mix with ours.
   * No delete: a pool thread of it may outlive its last user. */
  return dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
}

static const void *load(const char *name, const char *symbol, int version, char *err) {
  char dir[4096], tried[1024] = "";
  size_t len = 0;
  own_dir(dir, sizeof dir);
  void *h = open_in(getenv("DEPLOY_MODULE_DIR"), name, tried, sizeof tried, &len);
  if (!h)
    h = open_in(dir, name, tried, sizeof tried, &len);
  /* Installed: deployctl in PREFIX/bin, deploy.so in PREFIX/lib/lua/5.4,
   * the modules in PREFIX/lib/deployctl, whatever PREFIX is (a package, a
   * scratch prefix, a DESTDIR). */
  char rel[4200];
  if (!h && dir[0]) {
    dc_fmt(rel, sizeof rel, "%s/../lib/deployctl", dir);
    h = open_in(rel, name, tried, sizeof tried, &len);
  }
  if (!h && dir[0]) {
    dc_fmt(rel, sizeof rel, "%s/../../deployctl", dir);
    h = open_in(rel, name, tried, sizeof tried, &len);
  }
  if (!h)
    h = open_in(DEPLOY_MODULE_INSTALL_DIR, name, tried, sizeof tried, &len);
  if (!h) {
    const char *why = dlerror();
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot load deploy-%s.so (looked in %s)%s%s: reinstall deployctl, or set "
           "DEPLOY_MODULE_DIR to the directory that holds it", name, tried, why ? ": " : "", why ? why : "");
    return NULL;
  }
  const int *api = dlsym(h, symbol);
  if (!api) {
    dc_fmt(err, DC_ERR_MAX, "deploy: deploy-%s.so has no %s: it is not a deployctl module, or a damaged one", name,
           symbol);
    return NULL;
  }
  if (*api != version) {
    dc_fmt(err, DC_ERR_MAX, "deploy: deploy-%s.so has interface version %d, this deployctl needs %d: install the "
           "deploy-%s.so of the same build", name, *api, version, name);
    return NULL;
  }
  return api;
}

const void *dc_module_api(const char *name, const char *symbol, int version, char *err) {
  const void *api = NULL;
  pthread_mutex_lock(&cache_lock);
  size_t i = 0;
  for (; i < sizeof cache / sizeof cache[0] && cache[i].name; i++) {
    if (strcmp(cache[i].name, name) == 0 && strcmp(cache[i].symbol, symbol) == 0) {
      api = cache[i].api;
      break;
    }
  }
  if (!api) {
    api = load(name, symbol, version, err);
    if (api && i < sizeof cache / sizeof cache[0])
      cache[i] = (loaded){name, symbol, api};
  }
  pthread_mutex_unlock(&cache_lock);
  return api;
}
