/* lconfig.c's field readers, for the files that read one section each
 * (lconfig_test.c). Each raises a Lua error naming the field's path. */
#ifndef DEPLOY_LCONFIG_READ_H
#define DEPLOY_LCONFIG_READ_H

#include <lua.h>

int lconfig_fail(lua_State *L, const char *path, const char *fmt, const char *a);
void lconfig_check_keys(lua_State *L, int idx, const char *path, const char *const *allowed);
double lconfig_num(lua_State *L, int idx, const char *path, const char *k, double def, double lo, double hi);
int lconfig_bool(lua_State *L, int idx, const char *path, const char *k, int def);
/* Pushes field k (a table, or nil when not required and absent): 1 if a table. */
int lconfig_sub_table(lua_State *L, int idx, const char *path, const char *k, int required);

#endif
