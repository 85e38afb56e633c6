#include <stdio.h>

int main(void) {
    printf("hello from a CMake build, version %s\n", VERSION);
    return 0;
}
