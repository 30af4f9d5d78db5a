/* engine/chat.h — chat templates recognised from tokenizer.chat_template.
 *
 * mneme does not run Jinja: it recognises the common template families by their
 * markers and renders them in C. Unknown templates are MN_EUNSUPPORTED for chat;
 * plain completion does not need a template.
 */
#ifndef MN_CHAT_H
#define MN_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "engine/err.h"

typedef enum mn_chat_kind {
    MN_CHAT_CHATML = 1,  /* <|im_start|>role\ncontent<|im_end|>\n  (SmolLM2, Qwen2) */
    MN_CHAT_LLAMA3 = 2,  /* <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> */
    MN_CHAT_LLAMA2 = 3,  /* <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nuser [/INST] answer </s> (Llama 2) */
    MN_CHAT_MISTRAL = 4, /* <s> [INST] system\n\nuser [/INST] answer</s> (Mistral v0.2+, Mixtral):
                          * [INST] without <<SYS>>, system prepended to the first user turn */
} mn_chat_kind;

typedef struct mn_chat_template {
    mn_chat_kind kind;
    char *default_system;   /* system message the template inserts when none is given, or NULL */
} mn_chat_template;

typedef struct mn_chat_msg { const char *role; const char *content; } mn_chat_msg;

/** Recognise a template's family (and its built-in default system message, if any).
 *  On success the caller frees with mn_chat_template_clear. */
mn_err mn_chat_template_detect(const char *tmpl, size_t len, mn_chat_template *out, mn_errbuf *eb);
void mn_chat_template_clear(mn_chat_template *t);
const char *mn_chat_kind_name(mn_chat_kind k);

/** Render messages (roles: system, user, assistant) into prompt text; with
 *  add_generation_prompt the assistant header is appended (the [INST] families ignore it:
 *  their prompt already ends in [/INST]). Like the Jinja templates, the text holds the
 *  BOS text for Llama 3 ("<|begin_of_text|>") and the [INST] families ("<s>", "</s>"),
 *  so tokenize it with MN_TOK_PARSE_SPECIAL and without MN_TOK_ADD_BOS; ChatML has no
 *  BOS. Llama 3 and Llama 2 strip whitespace around contents as their templates do.
 *  [INST] families need user/assistant turns alternating (after an optional first
 *  system message). *out is NUL-terminated,
 *  allocated with mn_malloc, owned by the caller. A role the family cannot express is
 *  MN_EINVALID naming the message index. */
mn_err mn_chat_render(const mn_chat_template *t, const mn_chat_msg *msgs, int n_msgs,
                      bool add_generation_prompt, char **out, size_t *out_len, mn_errbuf *eb);

#endif
