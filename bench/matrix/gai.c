#define _GNU_SOURCE
/* getaddrinfo(name, AF_UNSPEC) for each name read from stdin, one JSON line
   each: built with gcc (glibc) and with musl-gcc (musl). */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <time.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000.0 + t.tv_nsec / 1e6;
}

static const char *eai_name(int code) {
    switch (code) {
    case EAI_NONAME: return "EAI_NONAME";
    case EAI_AGAIN: return "EAI_AGAIN";
    case EAI_FAIL: return "EAI_FAIL";
#ifdef EAI_NODATA
    case EAI_NODATA: return "EAI_NODATA";
#endif
    case EAI_FAMILY: return "EAI_FAMILY";
    case EAI_MEMORY: return "EAI_MEMORY";
    case EAI_SYSTEM: return "EAI_SYSTEM";
    default: { static char buf[32]; snprintf(buf, sizeof buf, "EAI_%d", code); return buf; }
    }
}

int main(void) {
    char name[512];
    while (fgets(name, sizeof name, stdin)) {
        name[strcspn(name, "\r\n")] = 0;
        struct addrinfo hints = {0}, *res = NULL;
        hints.ai_socktype = SOCK_STREAM;
        double t = now_ms();
        int rc = getaddrinfo(name, NULL, &hints, &res);
        double elapsed = now_ms() - t;
        if (rc != 0) {
            printf("{\"error\": \"%s\", \"elapsed_ms\": %.1f}\n", eai_name(rc), elapsed);
        } else {
            printf("{\"addresses\": [");
            int first = 1;
            for (struct addrinfo *p = res; p; p = p->ai_next) {
                char buf[64];
                void *a = p->ai_family == AF_INET
                    ? (void *)&((struct sockaddr_in *)p->ai_addr)->sin_addr
                    : (void *)&((struct sockaddr_in6 *)p->ai_addr)->sin6_addr;
                inet_ntop(p->ai_family, a, buf, sizeof buf);
                printf("%s\"%s\"", first ? "" : ", ", buf);
                first = 0;
            }
            printf("], \"elapsed_ms\": %.1f}\n", elapsed);
            freeaddrinfo(res);
        }
        fflush(stdout);
    }
    return 0;
}
