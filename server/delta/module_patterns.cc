// Placeholder: being implemented.
#include "server/delta/module_patterns.h"
