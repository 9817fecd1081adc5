# Turns cli/deployctl.lua into a C string constant (no xxd needed).
file(READ ${IN} content HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," content "${content}")
file(WRITE ${OUT} "static const unsigned char deployctl_lua[] = {${content}0x00};\n")
