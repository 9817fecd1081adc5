# Turns text files into C string constants (no xxd needed).
#
# With VAR set, IN is one file and OUT declares `static const unsigned char VAR[]`
# holding its text, NUL-terminated (runtime/ssh_agent.sh).
#
# Without, IN is a ;-separated list of the CLI's Lua files; each becomes one
# entry of deployctl_modules, named after the file ("deployctl" for
# deployctl.lua, "deployctl.gitops" for gitops.lua).
if(DEFINED VAR)
  file(READ ${IN} content HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," content "${content}")
  file(WRITE ${OUT} "static const unsigned char ${VAR}[] = {${content}0x00};\n")
  return()
endif()
set(body "")
set(table "")
foreach(path ${IN})
  get_filename_component(base ${path} NAME_WE)
  file(READ ${path} content HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," content "${content}")
  string(APPEND body "static const unsigned char mod_${base}[] = {${content}0x00};\n")
  if(base STREQUAL "deployctl")
    set(name "deployctl")
  else()
    set(name "deployctl.${base}")
  endif()
  string(APPEND table "  {\"${name}\", mod_${base}, sizeof mod_${base} - 1},\n")
endforeach()
file(WRITE ${OUT} "${body}\nstatic const struct { const char *name; const unsigned char *code; size_t len; } deployctl_modules[] = {\n${table}  {0, 0, 0}\n};\n")
