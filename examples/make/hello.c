#include <stdio.h>

#include "version.h"

int main(void) {
    printf("hello from a make build, version %s\n", VERSION);
    return 0;
}
