/* server/main.c — the mneme binary: dispatch to a subcommand. */
#include <stdio.h>
#include <string.h>

#include "server/cli.h"

int cmd_serve(int argc, char **argv);   /* server/cli_serve.c */

static void usage(FILE *f) {
    fprintf(f,
            "usage: mneme <command> [options]\n"
            "commands:\n"
            "  generate  -m FILE -p TEXT [-n N] [--chat] [sampling flags]   stream a completion\n"
            "  info      -m FILE                                          architecture, shapes, types, tokenizer\n"
            "  tokenize  -m FILE -p TEXT [--special] [--bos]              token ids and pieces\n"
            "  bench     -m FILE [-p 512] [-n 128] [-t T] [-b B] [--json]  prompt / generation tokens/s\n"
            "  serve     -m FILE [--host H] [--port P] [--persist-dir D]   HTTP server: OpenAI API + sessions\n"
            "  logits    -m FILE --tokens 1,2,3 (-o OUT.f32 | --greedy N)  raw logits (for tests)\n"
            "Run 'mneme <command> --help' for the options of a command.\n"
            "The model defaults to $MNEME_MODEL, else SmolLM2-135M-Instruct.Q4_1.gguf in $MNEME_MODELS (~/.cache/mneme).\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "logits")) return cmd_logits(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve")) return cmd_serve(argc - 1, argv + 1);
    fprintf(stderr, "mneme: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
