/* tests/unit/test_chat.c — chat template recognition and rendering.
 *
 * Templates are the published Jinja texts (SmolLM2's from its GGUF; Llama 3, Llama 2
 * and Mistral from their tokenizer_config.json). The expected prompts are written out by
 * hand here from the published prompt formats, not from the renderer's output:
 *   ChatML   <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
 *   Llama 3  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
 *   Llama 2  <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
 *   Mistral  <s> [INST] {system}\n\n{user} [/INST] {answer}</s>
 * tests/python/test_chat_template.py checks the same renderer against jinja2.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/chat.h"

static const char SMOLLM2[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* Qwen2 style: the newline inside the literal is written as the escape \n */
static const char QWEN2[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char CHATML_PLAIN[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char LLAMA3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

static const char LLAMA2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

static const char MISTRAL[] =
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- endfor %}\n";

static const char MISTRAL_V01[] =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}";

static mn_chat_template detect_ok(const char *t, mn_chat_kind want) {
    mn_chat_template ct;
    mn_errbuf eb = { { 0 } };
    mn_err e = mn_chat_template_detect(t, strlen(t), &ct, &eb);
    if (e) fail_msg("detect: %s", eb.msg);
    assert_int_equal(ct.kind, want);
    return ct;
}

static void expect_render(const mn_chat_template *t, const mn_chat_msg *m, int n, bool gen, const char *want) {
    char *out = NULL;
    size_t len = 0;
    mn_errbuf eb = { { 0 } };
    mn_err e = mn_chat_render(t, m, n, gen, &out, &len, &eb);
    if (e) fail_msg("render: %s", eb.msg);
    if (strcmp(out, want) != 0) fail_msg("rendered\n[%s]\nwant\n[%s]", out, want);
    assert_int_equal(len, strlen(want));
    mn_free(out);
}

static void test_detect(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(SMOLLM2, MN_CHAT_CHATML);
    assert_string_equal(t.default_system, "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
    mn_chat_template_clear(&t);
    assert_null(t.default_system);
    t = detect_ok(QWEN2, MN_CHAT_CHATML);
    assert_string_equal(t.default_system, "You are a helpful assistant.");
    mn_chat_template_clear(&t);
    t = detect_ok(CHATML_PLAIN, MN_CHAT_CHATML);
    assert_null(t.default_system);
    t = detect_ok(LLAMA3, MN_CHAT_LLAMA3);
    assert_null(t.default_system);
    t = detect_ok(LLAMA2, MN_CHAT_LLAMA2);
    t = detect_ok(MISTRAL, MN_CHAT_MISTRAL);
    assert_string_equal(mn_chat_kind_name(MN_CHAT_MISTRAL), "mistral");

    mn_errbuf eb = { { 0 } };
    const char *gemma = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>{% endfor %}";
    assert_int_equal(mn_chat_template_detect(gemma, strlen(gemma), &t, &eb), MN_EUNSUPPORTED);
    assert_non_null(strstr(eb.msg, "not recognised"));
    assert_int_equal(mn_chat_template_detect(MISTRAL_V01, strlen(MISTRAL_V01), &t, &eb), MN_EUNSUPPORTED);
    assert_int_equal(mn_chat_template_detect("", 0, &t, &eb), MN_EUNSUPPORTED);
}

static void test_chatml(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(SMOLLM2, MN_CHAT_CHATML);
    mn_chat_msg u[] = { { "user", "Hi there" } };
    expect_render(&t, u, 1, true,
                  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
    mn_chat_msg conv[] = { { "system", "Be brief." }, { "user", " a " }, { "assistant", "b\n" }, { "user", "c" } };
    expect_render(&t, conv, 4, false,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n a <|im_end|>\n"
                  "<|im_start|>assistant\nb\n<|im_end|>\n<|im_start|>user\nc<|im_end|>\n");
    /* no messages: the loop never runs, so no default system either */
    expect_render(&t, NULL, 0, true, "<|im_start|>assistant\n");
    expect_render(&t, NULL, 0, false, "");
    mn_chat_template_clear(&t);
}

static void test_llama3(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(LLAMA3, MN_CHAT_LLAMA3);
    mn_chat_msg conv[] = { { "system", "You are terse." }, { "user", "  Hi\n\n" }, { "assistant", "Hello." },
                           { "user", "\xc2\xa0why?\xe3\x80\x80" } };
    expect_render(&t, conv, 4, true,
                  "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nwhy?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    mn_chat_msg one[] = { { "user", "x" } };
    expect_render(&t, one, 1, false, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>");
}

static void test_llama2(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(LLAMA2, MN_CHAT_LLAMA2);
    mn_chat_msg conv[] = { { "system", " Be kind." }, { "user", "Hi " }, { "assistant", " Hello! " },
                           { "user", "Bye" } };
    expect_render(&t, conv, 4, true,
                  "<s>[INST] <<SYS>>\n Be kind.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]");
    /* the whole <<SYS>> block is stripped as one string: the space before "Be kind." stays */
    expect_render(&t, conv, 2, false, "<s>[INST] <<SYS>>\n Be kind.\n<</SYS>>\n\nHi [/INST]");
    mn_chat_msg nosys[] = { { "user", "Q1" }, { "assistant", "A1" }, { "user", "Q2" } };
    expect_render(&t, nosys, 3, true, "<s>[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]");

    char *out = NULL;
    mn_errbuf eb = { { 0 } };
    mn_chat_msg bad[] = { { "user", "a" }, { "user", "b" } };
    assert_int_equal(mn_chat_render(&t, bad, 2, true, &out, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "messages[1]"));
    assert_null(out);
    mn_chat_msg bad2[] = { { "system", "s" }, { "assistant", "a" } };
    assert_int_equal(mn_chat_render(&t, bad2, 2, true, &out, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "messages[1]"));
    mn_chat_msg bad3[] = { { "user", "a" }, { "tool", "b" } };
    assert_int_equal(mn_chat_render(&t, bad3, 2, true, &out, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "'tool'"));
}

static void test_mistral(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(MISTRAL, MN_CHAT_MISTRAL);
    mn_chat_msg conv[] = { { "system", "Be kind." }, { "user", "Hi " }, { "assistant", "Hello!" },
                           { "user", "Bye" } };
    expect_render(&t, conv, 4, true, "<s> [INST] Be kind.\n\nHi  [/INST] Hello!</s> [INST] Bye [/INST]");
    mn_chat_msg nosys[] = { { "user", "Q1" }, { "assistant", "A1" }, { "user", "Q2" } };
    expect_render(&t, nosys, 3, false, "<s> [INST] Q1 [/INST] A1</s> [INST] Q2 [/INST]");
    mn_errbuf eb = { { 0 } };
    char *out = NULL;
    mn_chat_msg bad[] = { { "user", "a" }, { "assistant", "b" }, { "system", "c" } };
    assert_int_equal(mn_chat_render(&t, bad, 3, true, &out, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "messages[2]"));
}

static void test_bad_input_and_oom(void **st) {
    (void)st;
    mn_chat_template t = detect_ok(SMOLLM2, MN_CHAT_CHATML);
    mn_errbuf eb = { { 0 } };
    char *out = NULL;
    mn_chat_msg noc[] = { { "user", "a" }, { "user", NULL } };
    assert_int_equal(mn_chat_render(&t, noc, 2, true, &out, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "messages[1]"));
    long live = mn_alloc_live();
    mn_chat_msg m[] = { { "user", "hello" } };
    int failures = 0;
    for (long k = 0; k < 8; k++) {
        mn_alloc_fail_after(k);
        mn_err e = mn_chat_render(&t, m, 1, true, &out, NULL, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) mn_free(out);
        else { assert_int_equal(e, MN_ENOMEM); failures++; }
        assert_int_equal(mn_alloc_live(), live);
    }
    assert_true(failures > 0);
    mn_chat_template_clear(&t);
    live = mn_alloc_live();
    for (long k = 0; k < 4; k++) {
        mn_alloc_fail_after(k);
        mn_err e = mn_chat_template_detect(SMOLLM2, strlen(SMOLLM2), &t, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) assert_non_null(t.default_system);
        else assert_int_equal(e, MN_ENOMEM);
        mn_chat_template_clear(&t);
        assert_int_equal(mn_alloc_live(), live);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_detect),
        cmocka_unit_test(test_chatml),
        cmocka_unit_test(test_llama3),
        cmocka_unit_test(test_llama2),
        cmocka_unit_test(test_mistral),
        cmocka_unit_test(test_bad_input_and_oom),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
