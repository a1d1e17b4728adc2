/* The pod sandbox ("pause") process of the test cluster's containerd: it holds the pod's namespaces and
 * does nothing else. PID 1 of a container ignores signals it has no handler for, so it handles SIGTERM and
 * SIGINT to exit at once, and reaps children it inherits (the pod's shared PID namespace case). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    signal(SIGCHLD, reap);
    for (;;) {
        pause();
    }
}
