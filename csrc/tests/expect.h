// EXPECT(cond): the host tests' check, always on (assert disappears in a Release build).
#pragma once

#include <cstdio>
#include <cstdlib>

#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)
