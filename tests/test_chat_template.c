/* test_chat_template: the Jinja2-subset interpreter behind chat templates.
 *
 * - The goldens: every case of goldens/chat-templates.public.json with the real Qwen3 and Llama 3 templates, and
 *   the chat cases of goldens/kjv-qwen3.goldens.json, byte for byte.
 * - One table of constructs (whitespace control, trim_blocks/lstrip_blocks, literals, operators, tests, filters,
 *   methods, loops, scoping, namespace, macros, call blocks) whose expected outputs come from jinja2 3.1 itself,
 *   configured like Hugging Face's apply_chat_template (sandboxed, trim_blocks, lstrip_blocks, loopcontrols,
 *   tojson = json.dumps(ensure_ascii=False)).
 * - Qwen3 multi-turn conversations with <think> reasoning, tool calls and tool responses (expected text derived
 *   from reading the template).
 * - Errors: malformed and unsupported templates, raise_exception, every render limit, hostile templates;
 *   concurrent renders of one compiled template.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "check.h"
#include "core/core.h"
#include "tokenizer/chat_template.h"

/* Generated from jinja2 3.1 (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, HF tojson) */
static const char *const unit_vars_json =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"sys\"}, {\"role\": \"user\", \"content\": \"h\303\251llo w\303\266rld\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nr\\n</think>\\n\\nans\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": [1, 2.5, null, true], \"c\": \"x\\\"y\"}}}]}], \"d\": {\"a\": 1, \"items\": [1, 2], \"b\": {\"c\": \"deep\"}}, \"s\": \"  Hello World  \", \"n\": 5, \"f\": 2.5, \"l\": [3, 1, 2], \"e\": [], \"t\": true, \"z\": null, \"u8\": \"h\303\251llo w\303\266rld\", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get\", \"description\": \"Get \303\251\", \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"string\"}}}}}]}";
static const struct unit_case {
    const char *name, *src, *expect;
} unit_cases[] = {
    {"ws_trim_lstrip",
     "a\n{% if true %}\nb\n{% endif %}\nc\n",
     "a\nb\nc"},
    {"ws_lstrip_indented",
     "a\n  {% if true %}  \n  b\n  {% endif %}\nc",
     "a\n  \n  b\nc"},
    {"ws_lstrip_start",
     "  {% if true %}x{% endif %}  \n",
     "x  "},
    {"ws_minus_both",
     "a  \n  {%- if 1 %} b {% endif -%}  \n  c",
     "a b c"},
    {"ws_minus_inside",
     "{%- if true -%}\n   c\n{%- endif -%}\n  d",
     "cd"},
    {"ws_plus_no_lstrip",
     "  {%+ if true %}e{% endif %}",
     "  e"},
    {"ws_plus_no_trim",
     "{% if true +%}\nx{% endif %}",
     "\nx"},
    {"ws_var_not_lstripped",
     "  {{ 1 }}  \n  {{- 2 -}}  \n",
     "  12"},
    {"ws_var_minus",
     "x {{- 3 -}} y",
     "x3y"},
    {"ws_comment",
     "a\n  {# c #}\nb\n  {#- c2 -#}   g",
     "a\nbg"},
    {"ws_raw",
     "{% raw %}{{ not parsed }}{% endraw %}|  {% raw -%}   X {{ y }}   {%- endraw %}",
     "{{ not parsed }}|  X {{ y }}"},
    {"ws_crlf",
     "{% if true %}\r\nA\r\n{% endif %}\r\nB\r\n",
     "A\nB"},
    {"ws_trailing_newline",
     "x\n\n",
     "x\n"},
    {"ws_for_lines",
     "{% for i in range(3) %}\n  {{ i }}\n{% endfor %}\n",
     "  0\n  1\n  2\n"},
    {"ws_tabs",
     "\t{% set x = 1 %}\n\t{{ x }}",
     "\t1"},
    {"ws_nbsp_not_lstripped_newline",
     "a\n\302\240{% if true %}b{% endif %}",
     "a\nb"},
    {"lit_strings",
     "{{ \"dq\" 'adjacent' }}|{{ 'esc\\t\\x41\\u00e9\\101\\z' }}|{{ 'it\\'s' }}|{{ '\\\\' }}",
     "dqadjacent|esc\tA\303\251A\\z|it's|\\"},
    {"lit_numbers",
     "{{ 1_000 }} {{ 0x1F }} {{ 0b101 }} {{ 0o17 }} {{ 1.5e3 }} {{ 1E2 }} {{ 10.0 }} {{ 42 }} {{ -7 }}",
     "1000 31 5 15 1500.0 100.0 10.0 42 -7"},
    {"lit_consts",
     "{{ true }} {{ True }} {{ false }} {{ False }} {{ none }} {{ None }}",
     "True True False False None None"},
    {"lit_containers",
     "{{ [1, 'a', none, true, 1.5] }} {{ {'a': [1, {'b': (1,)}], 2: none, 'q': \"it's\"} }} {{ (1,) }} {{ () }} {{ (1, 2) }} {{ 1, 2 }}",
     "[1, 'a', None, True, 1.5] {'a': [1, {'b': (1,)}], 2: None, 'q': \"it's\"} (1,) () (1, 2) (1, 2)"},
    {"print_floats",
     "{{ 0.1 + 0.2 }} {{ 1/3 }} {{ 10/2 }} {{ 1e16 }} {{ 1e15 }} {{ 1.5e-5 }} {{ 123456789.123 }} {{ -0.0 }} {{ 2.0**60 }} {{ 1e-4 }} {{ 3.0e10 }}",
     "0.30000000000000004 0.3333333333333333 5.0 1e+16 1000000000000000.0 1.5e-05 123456789.123 -0.0 1.152921504606847e+18 0.0001 30000000000.0"},
    {"print_repr_unicode",
     "{{ ['\303\251\\t\\x01\\x7f\\u00ad\\u2028\\U0001F600', \"it's\", '\"', '\\'\"'] }}",
     "['\303\251\\t\\x01\\x7f\\xad\\u2028\360\237\230\200', \"it's\", '\"', '\\'\"']"},
    {"access",
     "{{ d.a }} {{ d['a'] }} {{ d.b.c }} {{ d['b']['c'] }} {{ messages[0].role }} {{ messages.0.role }} {{ messages[-1]['role'] }}",
     "1 1 deep deep system system assistant"},
    {"access_method_vs_key",
     "{{ d['items'] }} {{ d.items is callable }}",
     "[1, 2] True"},
    {"slicing",
     "{{ 'abc'[::-1] }} {{ l[1:] }} {{ l[-1] }} {{ l[:-1] }} {{ l[::2] }} {{ l[::-1] }} {{ l[5:1:-1] }} {{ l[-100:100] }} {{ l[10] }}|{{ 'abc'[1] }}",
     "cba [1, 2] 2 [3, 1] [3, 2] [2, 1, 3] [2] [3, 1, 2] |b"},
    {"slicing_unicode",
     "{{ u8[1:3] }} {{ u8[-2:] }} {{ u8[::-1] }} {{ u8|length }} {{ u8[1] }} {{ u8[::3] }}",
     "\303\251l ld dlr\303\266w oll\303\251h 11 \303\251 hlwl"},
    {"messages_reversed",
     "{% for m in messages[::-1] %}{{ m.role }},{% endfor %}",
     "assistant,user,system,"},
    {"arith",
     "{{ 1 + 2 * 3 - 4 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7.5 % 2 }} {{ -7.5 // 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 2 ** 3 ** 2 }} {{ n * f }} {{ n - f }} {{ true + 1 }}",
     "5.0 3 -4 1 2 1.5 -4.0 1024 0.5 64 12.5 2.5 2"},
    {"concat_tilde",
     "{{ 'a' ~ 1 ~ none ~ true ~ undefined_var ~ 2.0 }}|{{ [1, 2] ~ 'x' }}",
     "a1NoneTrue2.0|[1, 2]x"},
    {"seq_ops",
     "{{ 'ab' * 3 }} {{ [1] * 2 }} {{ [1] + [2] }} {{ 'x' + 'y' }} {{ (1,) + (2,) }}",
     "ababab [1, 1] [1, 2] xy (1, 2)"},
    {"unary",
     "{{ -n }} {{ +n }} {{ - - n }} {{ -1|abs }} {{ (-1)|abs }} {{ 2 * -1 }} {{ not n }}",
     "-5 5 5 1 1 -2 False"},
    {"compare",
     "{{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ [1,2] < [1,3] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'b' >= 'a' }} {{ 1 != 2 }} {{ [1] == (1,) }} {{ (1, 2) == (1, 2) }} {{ none == none }}",
     "True True True True False True True False True True"},
    {"membership",
     "{{ 'a' in 'cat' }} {{ 2 not in l }} {{ 'a' in d }} {{ 'zz' in d }} {{ 3 in l }} {{ '' in 'x' }} {{ 'x' in undefined_var }}",
     "True False True False True True False"},
    {"logic",
     "{{ true and 'x' }} {{ false or 'y' }} {{ none or 0 }} {{ not none }} {{ 0 and 1 }} {{ 'a' and 'b' or 'c' }} {{ not 1 == 2 }}",
     "x y 0 True 0 b True"},
    {"condexpr",
     "[{{ 'a' if false }}] {{ 'a' if false else 'b' }} {{ 1 if n > 3 else 2 }} {{ 'x' if none else 'y' if 0 else 'z' }}",
     "[] b 1 z"},
    {"tests_types",
     "{{ x is defined }}{{ n is defined }}{{ x is undefined }}{{ z is none }}{{ n is not none }}{{ s is string }}{{ n is string }}{{ n is number }}{{ f is number }}{{ t is number }}{{ n is integer }}{{ f is integer }}{{ t is integer }}{{ f is float }}{{ t is boolean }}{{ n is boolean }}",
     "FalseTrueTrueTrueTrueTrueFalseTrueTrueTrueTrueFalseFalseTrueTrueFalse"},
    {"tests_containers",
     "{{ d is mapping }}{{ l is mapping }}{{ l is iterable }}{{ s is iterable }}{{ d is iterable }}{{ n is iterable }}{{ l is sequence }}{{ s is sequence }}{{ n is sequence }}{{ x is iterable }}",
     "TrueFalseTrueTrueTrueFalseTrueTrueFalseTrue"},
    {"tests_values",
     "{{ t is true }}{{ t is false }}{{ 1 is true }}{{ n is even }}{{ n is odd }}{{ 10 is divisibleby 5 }}{{ 10 is divisibleby(3) }}{{ n is eq 5 }}{{ n is equalto 4 }}{{ n is eq(5) }}{{ 3 is gt 2 }}{{ 3 is lt 2 }}{{ 'a' is in 'abc' }}{{ 'ab' is lower }}{{ 'AB' is upper }}{{ none is sameas none }}{{ range is callable }}{{ n is ne 5 }}{{ 2 is ge 2 }}{{ 2 is le 1 }}",
     "TrueFalseFalseFalseTrueTrueFalseTrueFalseTrueTrueFalseTrueTrueTrueTrueTrueFalseTrueFalse"},
    {"f_strings",
     "{{ s|trim }}|{{ s|length }}|{{ s|lower }}|{{ s|upper }}|{{ 'hello world'|title }}|{{ \"they're x-y(z\"|title }}|{{ 'hELLO'|capitalize }}|{{ s|replace('l', 'L') }}|{{ s|replace('l', 'L', 1) }}|{{ 'xaxbx'|trim('x') }}|{{ '\302\240a\342\200\203'|trim }}",
     "Hello World|15|  hello world  |  HELLO WORLD  |Hello World|They're X-Y(Z|Hello|  HeLLo WorLd  |  HeLlo World  |axb|a"},
    {"f_lists",
     "{{ l|join(',') }}|{{ l|join }}|{{ l|first }}|{{ l|last }}|{{ e|first }}|{{ l|list }}|{{ l|sort }}|{{ l|sort(reverse=true) }}|{{ l|reverse|list }}|{{ 'abc'|reverse }}|{{ l|length }}|{{ l|count }}|{{ l|sum }}|{{ l|min }}|{{ l|max }}|{{ 'abc'|list }}",
     "3,1,2|312|3|2||[3, 1, 2]|[1, 2, 3]|[3, 2, 1]|[2, 1, 3]|cba|3|3|6|1|3|['a', 'b', 'c']"},
    {"f_tojson",
     "{{ tools[0]|tojson }}\n{{ tools|tojson(indent=2) }}\n{{ messages[2].tool_calls[0].function.arguments|tojson }}\n{{ {'b': 1, 'a': 2}|tojson(sort_keys=true) }}\n{{ '\303\251\\n\"<>&'|tojson }} {{ '\303\251\360\237\230\200'|tojson(ensure_ascii=true) }} {{ [1.0, 1e20, 0.1, -0.0]|tojson }} {{ l|tojson(separators=(',', ':')) }} {{ {'a': [], 'b': {}}|tojson(indent=1) }} {{ {1: true, none: false}|tojson }} {{ 'x\\x1f\\x7f'|tojson }}",
     "{\"type\": \"function\", \"function\": {\"name\": \"get\", \"description\": \"Get \303\251\", \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"string\"}}}}}\n[\n  {\n    \"type\": \"function\",\n    \"function\": {\n      \"name\": \"get\",\n      \"description\": \"Get \303\251\",\n      \"parameters\": {\n        \"type\": \"object\",\n        \"properties\": {\n          \"x\": {\n            \"type\": \"string\"\n          }\n        }\n      }\n    }\n  }\n]\n{\"a\": 1, \"b\": [1, 2.5, null, true], \"c\": \"x\\\"y\"}\n{\"a\": 2, \"b\": 1}\n\"\303\251\\n\\\"<>&\" \"\\u00e9\\ud83d\\ude00\" [1.0, 1e+20, 0.1, -0.0] [3,1,2] {\n \"a\": [],\n \"b\": {}\n} {\"1\": true, \"null\": false} \"x\\u001f\177\""},
    {"f_map_select",
     "{{ messages|map(attribute='role')|join(',') }}|{{ messages|selectattr('role', 'equalto', 'user')|list|length }}|{{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|list }}|{{ [1, 2, 3, 4, 5]|select('odd')|list }}|{{ [1, 2, 3, 4, 5]|reject('even')|list }}|{{ [0, 1, '', none, 'a']|select|list }}|{{ ['a', 'B']|map('upper')|list }}|{{ messages|selectattr('tool_calls', 'defined')|list|length }}|{{ messages|map(attribute='missing', default='D')|list }}|{{ [{'a': {'b': 1}}]|map(attribute='a.b')|list }}",
     "system,user,assistant|1|['system', 'assistant']|[1, 3, 5]|[1, 3, 5]|[1, 'a']|['A', 'B']|1|['D', 'D', 'D']|[1]"},
    {"f_unique_sort",
     "{{ ['b', 'A', 'a', 'B']|unique|list }}{{ ['b', 'A', 'a', 'B']|unique(case_sensitive=true)|list }}{{ [{'a': 2}, {'a': 1}]|sort(attribute='a') }}{{ ['b', 'A', 'a']|sort }}{{ ['b', 'A', 'a']|sort(case_sensitive=true) }}",
     "['b', 'A']['b', 'A', 'a', 'B'][{'a': 1}, {'a': 2}]['A', 'a', 'b']['A', 'a', 'b']"},
    {"f_dictsort_items",
     "{{ d|dictsort }}|{{ {'b': 2, 'a': 3, 'c': 1}|dictsort(by='value') }}|{{ {'B': 1, 'a': 2}|dictsort }}|{{ {'B': 1, 'a': 2}|dictsort(true) }}|{{ d|dictsort(reverse=true) }}|{{ d|items|list }}|{{ undefined_var|items|list }}",
     "[('a', 1), ('b', {'c': 'deep'}), ('items', [1, 2])]|[('c', 1), ('b', 2), ('a', 3)]|[('a', 2), ('B', 1)]|[('B', 1), ('a', 2)]|[('items', [1, 2]), ('b', {'c': 'deep'}), ('a', 1)]|[('a', 1), ('items', [1, 2]), ('b', {'c': 'deep'})]|[]"},
    {"f_indent",
     "{{ 'a\\nb\\n\\nc'|indent }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'a\\n\\nb\\n'|indent(2, blank=true) }}|{{ 'x'|indent('--', first=true) }}|{{ ''|indent }}|{{ 'a\\n'|indent(3) }}",
     "a\n    b\n\n    c|  a\n  b|a\n  \n  b\n  |--x||a\n"},
    {"f_numbers",
     "{{ 3.7|int }} {{ '42'|int }} {{ 'x'|int }} {{ 'x'|int(5) }} {{ '3.5'|int }} {{ '0x1A'|int(base=16) }} {{ '3.5'|float }} {{ 3|float }} {{ 'abc'|float }} {{ -3|abs }} {{ -2.5|abs }} {{ 2.5|round }} {{ 3.5|round }} {{ 3.14159|round(2) }} {{ 3.7|round(0, 'floor') }} {{ 3.2|round(method='ceil') }} {{ 7|round }}",
     "3 42 0 5 3 26 3.5 3.0 0.0 3 2.5 2.0 4.0 3.14 3.0 4.0 7"},
    {"f_misc",
     "{{ 'a b  c'|wordcount }} {{ '<&\\'\">'|e }} {{ '<a>'|escape }} {{ 'x'|safe }} {{ 5|string }} {{ none|string }} {{ [1, 'a']|string }} {{ undefined_var|default('dflt') }} {{ ''|default('e', true) }} {{ none|d('n') }} {{ 0|default(7) }} {{ 'ab'|center(6) }}| {{ [1, 2, 3]|batch(2)|list }} {{ 'hello big world'|truncate(9) }}",
     "3 &lt;&amp;&#39;&#34;&gt; &lt;a&gt; x 5 None [1, 'a'] dflt e None 0   ab  | [[1, 2], [3]] hello..."},
    {"f_format",
     "{{ '%s-%s'|format('a', 'b') }} {{ '%(k)s'|format(k='v') }} {{ '%s=%d' % ('a', 3) }} {{ '%5.2f|%-3s|%r|%x|%05d' % (3.14159, 'a', 'q', 255, 42) }} {{ '%.2s' % 'abc' }} {{ '100%%' % () }}",
     "a-b v a=3  3.14|a  |'q'|ff|00042 ab 100%"},
    {"m_strip_split",
     "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxhixx'.strip('x') }}|{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(' ', 1) }}|{{ 'a b c'.rsplit(' ', 1) }}|{{ ' a  b '.split(none, 1) }}|{{ 'a\\nb'.split('\\n') }}",
     "Hello World|Hello World  |  Hello World|hi|['Hello', 'World']|['a', 'b', '', 'c']|['a', 'b c']|['a b', 'c']|['a', 'b ']|['a', 'b']"},
    {"m_search",
     "{{ s.startswith('  H') }} {{ s.endswith('x') }} {{ 'x'.startswith(('a', 'x')) }} {{ s.find('World') }} {{ u8.find('l') }} {{ s.find('zz') }} {{ s.rfind('l') }} {{ s.count('l') }} {{ 'a-b'.replace('-', '+') }} {{ 'aaa'.replace('a', 'b', 2) }}",
     "True False True 8 2 -1 11 3 a+b bba"},
    {"m_case_join_format",
     "{{ s.upper() }} {{ s.lower() }} {{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }} {{ ', '.join(['a', 'b']) }} {{ '{} and {}'.format(1, 'x') }} {{ '{0}{1}{0}'.format('a', 'b') }} {{ '{name}!'.format(name='N') }} {{ '{:>4}|{:.2f}'.format('a', 3.14159) }}",
     "  HELLO WORLD     hello world   Hello World Hello a, b 1 and x aba N!    a|3.14"},
    {"m_misc",
     "{{ 'a-b-c'.partition('-') }} {{ 'ab'.zfill(4) }} {{ 'ab'.ljust(4, '*') }} {{ 'pre_x'.removeprefix('pre_') }} {{ 'a\\nb\\r\\nc'.splitlines() }} {{ '12'.isdigit() }} {{ 'ab'.isalpha() }} {{ ' '.isspace() }} {{ '\303\237'.upper() }} {{ '\316\237\316\224\316\237\316\243'.lower() }}",
     "('a', '-', 'b-c') 00ab ab** x ['a', 'b', 'c'] True True True SS \316\277\316\264\316\277\317\202"},
    {"m_dict_list",
     "{{ d.items()|list }} {{ d.keys()|list }} {{ d.values()|list }} {{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 7) }} {{ [1, 2, 1].count(1) }} {{ [1, 2].index(2) }}",
     "[('a', 1), ('items', [1, 2]), ('b', {'c': 'deep'})] ['a', 'items', 'b'] [1, [1, 2], {'c': 'deep'}] 1 None 7 2 1"},
    {"loop_vars",
     "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}|{% endfor %}",
     "1032TrueFalse3|2121FalseFalse3|3210FalseTrue3|"},
    {"loop_prev_next",
     "{% for x in l %}{{ loop.previtem }}-{{ loop.nextitem }};{% endfor %}",
     "-1;3-2;1-;"},
    {"loop_cycle_changed",
     "{% for x in [1, 1, 2, 2, 3] %}{{ loop.cycle('a', 'b') }}{% if loop.changed(x) %}{{ x }}{% endif %}{% endfor %}",
     "a1ba2ba3"},
    {"loop_unpack",
     "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [(1, 2), (3, 4)] %}{{ a }}{{ b }}{% endfor %}{% for a, (b, c) in [(1, (2, 3))] %}{{ a }}{{ b }}{{ c }}{% endfor %}",
     "a=1;items=[1, 2];b={'c': 'deep'};1234123"},
    {"loop_over_dict_string",
     "{% for k in d %}{{ k }};{% endfor %}{% for c in 'abc' %}{{ c }}.{% endfor %}",
     "a;items;b;a.b.c."},
    {"loop_filter_else",
     "{% for x in l if x > 1 %}{{ x }}:{{ loop.index }}/{{ loop.length }}{{ loop.last }} {% else %}none{% endfor %}|{% for x in e %}{{ x }}{% else %}empty{% endfor %}|{% for x in undefined_var %}X{% else %}U{% endfor %}",
     "3:1/2False 2:2/2True |empty|U"},
    {"loop_break_continue",
     "{% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}",
     "13"},
    {"loop_scoping",
     "{% set x = 1 %}{% for i in range(2) %}{{ x }}{% set x = x + 10 %}{{ x }};{% endfor %}{{ x }}|{% for i in [1] %}{% set inner = 5 %}{% endfor %}{{ inner }}",
     "111;111;1|"},
    {"loop_nested",
     "{% for a in [1, 2] %}{% for b in 'xy' %}{{ loop.index }}{{ a }}{{ b }} {% endfor %}{{ loop.index }};{% endfor %}",
     "11x 21y 1;12x 22y 2;"},
    {"loop_recursive",
     "{%- set items = [{'n': 'a', 'c': [{'n': 'b', 'c': []}]}] %}{% for it in items recursive %}<{{ it.n }}{{ loop.depth }}{{ loop(it.c) }}>{% endfor %}",
     "<a1<b2>>"},
    {"range",
     "{{ range(5)|list }}{{ range(2, 5)|list }}{{ range(10, 0, -3)|list }}{{ range(0)|list }}",
     "[0, 1, 2, 3, 4][2, 3, 4][10, 7, 4, 1][]"},
    {"if_elif",
     "{% for m in messages %}{% if m.role == 'user' %}U{% elif m.role == 'assistant' %}A{% elif m.role == 'system' %}S{% else %}?{% endif %}{% endfor %}",
     "SUA"},
    {"set_scoping_if",
     "{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}",
     "2"},
    {"set_tuple_block",
     "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = (3, 4) %}{{ c[0] }}|{% set blk %}block {{ n }}{% endset %}[{{ blk }}]{% set up | upper %}x{{ n }}{% endset %}{{ up }}",
     "123|[block 5]X5"},
    {"namespace",
     "{% set ns = namespace(a=0, found=false) %}{% for x in l %}{% set ns.a = ns.a + x %}{% if x == 1 %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.a }} {{ ns.found }} {{ ns }}",
     "6 True <Namespace {'a': 6, 'found': True}>"},
    {"dict_global",
     "{{ dict(a=1, b=2) }}{{ namespace({'k': 1}).k }}",
     "{'a': 1, 'b': 2}1"},
    {"macro_args",
     "{% macro m(a, b=2, c='x') %}{{ a }}{{ b }}{{ c }}{% endmacro %}{{ m(1) }} {{ m(1, 3) }} {{ m(1, c='y') }} {{ m(b=5, a=0) }} [{{ m() }}]",
     "12x 13x 12y 05x [2x]"},
    {"macro_varargs",
     "{% macro m(a) %}<{{ a }}{{ varargs }}{{ kwargs }}>{% endmacro %}{{ m(1, 2, 3, k=4) }}",
     "<1(2, 3){'k': 4}>"},
    {"macro_caller",
     "{% macro outer() %}[{{ caller() }}]{% endmacro %}{% call outer() %}inside {{ n }}{% endcall %}|{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro %}{% call(x) each(l) %}<{{ x }}>{% endcall %}",
     "[inside 5]|<3><1><2>"},
    {"macro_recursion_scope",
     "{% macro fact(k) %}{% if k <= 1 %}1{% else %}{{ k * fact(k - 1)|int }}{% endif %}{% endmacro %}{{ fact(5) }}|{% macro show() %}{{ late }}{% endmacro %}{% set late = 'L' %}{{ show() }}",
     "120|L"},
    {"filter_with_blocks",
     "{% filter upper %}hello {{ s|trim }}{% endfilter %}|{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a }}",
     "HELLO HELLO WORLD|3"},
    {"joiner",
     "{% set j = joiner('|') %}{% for x in l %}{{ j() }}{{ x }}{% endfor %}",
     "3|1|2"},
    {"undefined",
     "[{{ nothing }}][{{ nothing|length }}][{{ nothing is defined }}][{{ d.missing }}][{{ d.missing is defined }}][{{ l[10] is defined }}]",
     "[][0][False][][False][False]"},
    {"qwen_think_split",
     "{{ messages[2]['content'].split('</think>')[-1].lstrip('\\n') }}|{{ messages[2].content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}",
     "ans|r"},
    {"lazy_generators",
     "{{ 'yes' if e|select else 'no' }}|{{ 'yes' if messages|selectattr('role', 'eq', 'nobody') else 'no' }}|{{ l|select('odd')|list }}|{{ (l|reverse)[0] is defined }}|{{ l|map('string') is sequence }}|{{ l|map('string') is iterable }}|{{ l|unique|first }}|{{ d|items|list|length }}",
     "yes|yes|[3, 1]|False|False|True|3|3"},
    {"unknown_filter_in_untaken_branch",
     "{% if false %}{{ x|no_such_filter }}{% endif %}{{ 1 if true else x|no_such_filter }}[{{ 'a' if false and x is no_such_test }}]",
     "1[]"},
    {"system_extract",
     "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}{{ sys }}{{ msgs|length }}",
     "sys2"},
};

static const char *const qwen_tools_json =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"City name\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"city\"]}}}]";
static const char *const qwen_m1_json =
    "[{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\": \"user\", \"content\": \"What's the weather in Paris?\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nI should call the weather tool.\\n</think>\\n\\nLet me check.\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}}]}, {\"role\": \"tool\", \"content\": \"{\\\"temp\\\": 18, \\\"sky\\\": \\\"cloudy\\\"}\"}, {\"role\": \"tool\", \"content\": \"second result\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nThe tool says 18C.\\n</think>\\n\\nIt is 18\302\260C and cloudy in Paris.\"}, {\"role\": \"user\", \"content\": \"Thanks! And in Rome?\"}, {\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}}]}]";
static const char *const qwen_m2_json =
    "[{\"role\": \"user\", \"content\": \"Weather in Oslo?\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nNeed the tool.\\n</think>\\n\\n\", \"tool_calls\": [{\"function\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}}]}, {\"role\": \"tool\", \"content\": \"{\\\"temp\\\": -3}\"}]";
static const char *const qwen_m3_json =
    "[{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nT1\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"<tool_response>\\nR\\n</tool_response>\"}, {\"role\": \"assistant\", \"content\": \"A2\", \"reasoning_content\": \"T2\"}]";
static const char *const qwen_exp1 =
    "<|im_start|>system\n"
    "You are a helpful assistant.\n"
    "\n"
    "# Tools\n"
    "\n"
    "You may call one or more functions to assist with the user query.\n"
    "\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
    "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"City name\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"city\"]}}}\n"
    "</tools>\n"
    "\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "What's the weather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "Let me check.\n"
    "<tool_call>\n"
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "<tool_response>\n"
    "{\"temp\": 18, \"sky\": \"cloudy\"}\n"
    "</tool_response>\n"
    "<tool_response>\n"
    "second result\n"
    "</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
    "It is 18\302\260C and cloudy in Paris.<|im_end|>\n"
    "<|im_start|>user\n"
    "Thanks! And in Rome?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
    "\n"
    "</think>\n"
    "\n"
    "<tool_call>\n"
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n"
    "</tool_call><|im_end|>\n";
static const char *const qwen_exp2 =
    "<|im_start|>user\n"
    "Weather in Oslo?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
    "Need the tool.\n"
    "</think>\n"
    "\n"
    "<tool_call>\n"
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "<tool_response>\n"
    "{\"temp\": -3}\n"
    "</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n";
static const char *const qwen_exp3 =
    "<|im_start|>user\n"
    "Q<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
    "T1\n"
    "</think>\n"
    "\n"
    "A1<|im_end|>\n"
    "<|im_start|>user\n"
    "<tool_response>\n"
    "R\n"
    "</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
    "T2\n"
    "</think>\n"
    "\n"
    "A2<|im_end|>\n";

/* ---- helpers ---- */

/* Compiles and renders src with vars (JSON text, may be NULL). Returns the rc; *out is malloc'd on success. */
static int render_text(const char *src, const char *vars_json, const struct chat_template_limits *lim, char **out,
                       char *err)
{
    struct chat_template *t = NULL;
    json_t *vars = NULL;
    *out = NULL;
    err[0] = 0;
    if (vars_json) {
        json_error_t je;
        vars = json_loads(vars_json, 0, &je);
        if (!vars) {
            snprintf(err, ST_ERR_LEN, "test vars: %s", je.text);
            return ST_EINVAL;
        }
    }
    int rc = chat_template_compile(&t, src, err);
    if (rc == 0) {
        if (lim) chat_template_set_limits(t, lim);
        rc = chat_template_render(t, vars, out, NULL, err);
    }
    chat_template_free(t);
    json_decref(vars);
    return rc;
}

/* The chat_template of a fixture tokenizer_config.json (caller frees) and the config itself. */
static char *fixture_template(const char *rel, json_t **cfg_out)
{
    json_error_t je;
    /* tokenizer configs hold integers beyond 64 bits (model_max_length) */
    json_t *cfg = json_load_file(fixture_path(rel), JSON_DECODE_INT_AS_REAL, &je);
    if (!cfg) return NULL;
    const char *s = json_string_value(json_object_get(cfg, "chat_template"));
    char *r = s ? st_strdup(s) : NULL;
    if (cfg_out) *cfg_out = cfg;
    else json_decref(cfg);
    return r;
}

static const char *cfg_token(const json_t *cfg, const char *key)
{
    const json_t *t = json_object_get(cfg, key);
    if (json_is_object(t)) t = json_object_get(t, "content");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

static json_t *parse(const char *text)
{
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    if (!j) fprintf(stderr, "  bad JSON in test: %s\n", je.text);
    return j;
}

/* ---- construct table (expected outputs from jinja2) ---- */

static void test_constructs(void)
{
    for (size_t i = 0; i < ST_ARRAY_LEN(unit_cases); i++) {
        const struct unit_case *c = &unit_cases[i];
        char err[ST_ERR_LEN], *out;
        int rc = render_text(c->src, unit_vars_json, NULL, &out, err);
        CHECK_MSG(rc == 0, "%s: render failed: %s", c->name, err);
        if (rc == 0) {
            CHECK_MSG(strcmp(out, c->expect) == 0, "%s:\n    expected \"%s\"\n    got      \"%s\"", c->name, c->expect, out);
            free(out);
        }
    }
}

/* ---- goldens ---- */

static void test_golden_chat_templates(void)
{
    json_t *qcfg = NULL, *lcfg = NULL;
    char *qsrc = fixture_template("models/kjv-qwen3-21m-8bit/tokenizer_config.json", &qcfg);
    char *lsrc = fixture_template("tokenizers/llama3/tokenizer_config.json", &lcfg);
    json_error_t je;
    json_t *cases = json_load_file(fixture_path("goldens/chat-templates.public.json"), 0, &je);
    struct chat_template *qt = NULL, *lt = NULL;
    char err[ST_ERR_LEN];
    if (!qsrc || !lsrc || !cases) {
        free(qsrc);
        free(lsrc);
        json_decref(qcfg);
        json_decref(lcfg);
        json_decref(cases);
        SKIP("fixtures missing (run make fixtures)");
    }
    REQUIRE_MSG(chat_template_compile(&qt, qsrc, err) == 0, "qwen3 template: %s", err);
    REQUIRE_MSG(chat_template_compile(&lt, lsrc, err) == 0, "llama3 template: %s", err);
    REQUIRE(json_is_array(cases) && json_array_size(cases) > 0);
    size_t i, n_checked = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const json_t *msgs = json_object_get(c, "messages");
        bool gen = json_is_true(json_object_get(c, "add_generation_prompt"));
        int think = json_is_true(json_object_get(c, "enable_thinking")) ? 1 : 0;
        struct {
            const struct chat_template *t;
            const json_t *cfg;
            const char *key;
        } runs[] = {{qt, qcfg, "qwen3"}, {lt, lcfg, "llama3"}};
        for (size_t k = 0; k < ST_ARRAY_LEN(runs); k++) {
            const char *want = json_string_value(json_object_get(c, runs[k].key));
            char *out = NULL;
            if (!want) continue;
            int rc = chat_template_apply(runs[k].t, msgs, NULL, gen, think, cfg_token(runs[k].cfg, "bos_token"),
                                         cfg_token(runs[k].cfg, "eos_token"), NULL, &out, NULL, err);
            CHECK_MSG(rc == 0, "case %zu %s: %s", i, runs[k].key, err);
            if (rc == 0) {
                CHECK_MSG(strcmp(out, want) == 0, "case %zu %s:\n    expected \"%s\"\n    got      \"%s\"", i,
                          runs[k].key, want, out);
                n_checked++;
            }
            free(out);
        }
        /* The goldens pass enable_thinking=true for Qwen3; the template only looks for `is false`, so
         * leaving it undefined (what a client that does not set it gets) must render the same. */
        if (think == 1) {
            char *out = NULL;
            const char *want = json_string_value(json_object_get(c, "qwen3"));
            int rc = chat_template_apply(qt, msgs, NULL, gen, -1, NULL, "<|im_end|>", NULL, &out, NULL, err);
            CHECK_MSG(rc == 0 && want && strcmp(out, want) == 0, "case %zu qwen3 with enable_thinking undefined", i);
            free(out);
        }
    }
    CHECK(n_checked == 2 * json_array_size(cases));
    chat_template_free(qt);
    chat_template_free(lt);
    free(qsrc);
    free(lsrc);
    json_decref(qcfg);
    json_decref(lcfg);
    json_decref(cases);
}

static void test_golden_kjv_chat(void)
{
    json_t *cfg = NULL;
    char *src = fixture_template("models/kjv-qwen3-21m/tokenizer_config.json", &cfg);
    json_error_t je;
    json_t *g = json_load_file(fixture_path("goldens/kjv-qwen3.goldens.json"), 0, &je);
    char err[ST_ERR_LEN];
    struct chat_template *t = NULL;
    if (!src || !g) {
        free(src);
        json_decref(cfg);
        json_decref(g);
        SKIP("fixtures missing (run make fixtures)");
    }
    REQUIRE_MSG(chat_template_compile(&t, src, err) == 0, "%s", err);
    int n_chat = 0;
    static const char *const sets[] = {"bf16", "q8", "q4"};
    for (size_t s = 0; s < ST_ARRAY_LEN(sets); s++) {
        const json_t *cases = json_object_get(json_object_get(g, "cases"), sets[s]);
        size_t i;
        const json_t *c;
        json_array_foreach((json_t *)cases, i, c) {
            const char *kind = json_string_value(json_object_get(c, "kind"));
            if (!kind || strcmp(kind, "chat") != 0) continue;
            const json_t *et = json_object_get(c, "enable_thinking");
            int think = json_is_boolean(et) ? json_is_true(et) : -1;
            const char *want = json_string_value(json_object_get(c, "prompt"));
            char *out = NULL;
            int rc = chat_template_apply(t, json_object_get(c, "messages"), NULL, true, think, cfg_token(cfg, "bos_token"),
                                         cfg_token(cfg, "eos_token"), NULL, &out, NULL, err);
            CHECK_MSG(rc == 0, "%s case %zu: %s", sets[s], i, err);
            if (rc == 0) CHECK_MSG(want && strcmp(out, want) == 0, "%s case %zu:\n    expected \"%s\"\n    got      \"%s\"", sets[s], i, want, out);
            free(out);
            n_chat++;
        }
    }
    CHECK(n_chat >= 4);
    chat_template_free(t);
    free(src);
    json_decref(cfg);
    json_decref(g);
}

/* ---- Qwen3: reasoning, tool calls, tool responses ---- */

static void test_qwen3_multiturn_tools(void)
{
    json_t *cfg = NULL;
    char *src = fixture_template("models/kjv-qwen3-21m-8bit/tokenizer_config.json", &cfg);
    char err[ST_ERR_LEN];
    struct chat_template *t = NULL;
    if (!src) SKIP("fixtures missing (run make fixtures)");
    REQUIRE_MSG(chat_template_compile(&t, src, err) == 0, "%s", err);
    json_t *tools = parse(qwen_tools_json), *m1 = parse(qwen_m1_json), *m2 = parse(qwen_m2_json),
           *m3 = parse(qwen_m3_json);
    REQUIRE(tools && m1 && m2 && m3);
    char *out = NULL;
    /* tools in the system turn (tojson), a system prompt, <think> stripped from history, tool calls with mapping
     * and string arguments, consecutive tool responses grouped in one user turn, an empty think block for the
     * turn after the last user query */
    CHECK_MSG(chat_template_apply(t, m1, tools, false, -1, NULL, cfg_token(cfg, "eos_token"), NULL, &out, NULL, err) == 0,
              "%s", err);
    CHECK_MSG(out && strcmp(out, qwen_exp1) == 0, "conversation 1:\n    expected \"%s\"\n    got      \"%s\"", qwen_exp1, out);
    free(out);
    /* multi-step tool use: the reasoning of an assistant turn after the last user query is kept */
    CHECK_MSG(chat_template_apply(t, m2, NULL, true, -1, NULL, NULL, NULL, &out, NULL, err) == 0, "%s", err);
    CHECK_MSG(out && strcmp(out, qwen_exp2) == 0, "conversation 2:\n    expected \"%s\"\n    got      \"%s\"", qwen_exp2, out);
    free(out);
    /* a user turn that only wraps a tool response does not count as the last query; reasoning_content wins */
    CHECK_MSG(chat_template_apply(t, m3, NULL, false, 0, NULL, NULL, NULL, &out, NULL, err) == 0, "%s", err);
    CHECK_MSG(out && strcmp(out, qwen_exp3) == 0, "conversation 3:\n    expected \"%s\"\n    got      \"%s\"", qwen_exp3, out);
    free(out);
    /* enable_thinking=false opens the assistant turn with an empty think block */
    CHECK(chat_template_apply(t, m2, NULL, true, 0, NULL, NULL, NULL, &out, NULL, err) == 0);
    size_t el = strlen(qwen_exp2), ol = out ? strlen(out) : 0;
    CHECK(out && ol == el + strlen("<think>\n\n</think>\n\n") && strncmp(out, qwen_exp2, el) == 0 &&
          strcmp(out + el, "<think>\n\n</think>\n\n") == 0);
    free(out);
    json_decref(tools);
    json_decref(m1);
    json_decref(m2);
    json_decref(m3);
    chat_template_free(t);
    free(src);
    json_decref(cfg);
}

/* ---- the variables chat_template_apply passes ---- */

static void test_apply_variables(void)
{
    const char *src = "{{ enable_thinking is defined }}|{{ enable_thinking }}|{{ tools is none }}|{{ tools|length if tools else '-' }}|"
                      "{{ add_generation_prompt }}|[{{ bos_token }}]|[{{ eos_token }}]|{{ documents is none }}|"
                      "{{ messages|length }}|{{ custom }}";
    struct chat_template *t = NULL;
    char err[ST_ERR_LEN], *out = NULL;
    REQUIRE_MSG(chat_template_compile(&t, src, err) == 0, "%s", err);
    json_t *msgs = parse("[{\"role\": \"user\", \"content\": \"x\"}]"), *tools = parse("[{\"name\": \"f\"}]");
    json_t *extra = parse("{\"custom\": 7, \"enable_thinking\": true, \"bos_token\": \"B\"}");
    REQUIRE(msgs && tools && extra);
    CHECK_MSG(chat_template_apply(t, msgs, NULL, true, -1, NULL, NULL, NULL, &out, NULL, err) == 0, "%s", err);
    CHECK_STR(out, "False||True|-|True|[]|[]|True|1|");
    free(out);
    CHECK(chat_template_apply(t, msgs, tools, false, 0, "<s>", "</s>", NULL, &out, NULL, err) == 0);
    CHECK_STR(out, "True|False|False|1|False|[<s>]|[</s>]|True|1|");
    free(out);
    /* extra variables (the API's chat_template_kwargs) apply unless an explicit argument says otherwise */
    CHECK(chat_template_apply(t, msgs, NULL, true, -1, NULL, NULL, extra, &out, NULL, err) == 0);
    CHECK_STR(out, "True|True|True|-|True|[B]|[]|True|1|7");
    free(out);
    CHECK(chat_template_apply(t, msgs, NULL, true, 0, "S", NULL, extra, &out, NULL, err) == 0);
    CHECK_STR(out, "True|False|True|-|True|[S]|[]|True|1|7");
    free(out);
    /* bad arguments */
    CHECK(chat_template_apply(t, tools == NULL ? msgs : extra, NULL, true, -1, NULL, NULL, NULL, &out, NULL, err) == ST_EINVAL);
    CHECK(out == NULL && strstr(err, "messages") != NULL);
    CHECK(chat_template_apply(t, msgs, extra, true, -1, NULL, NULL, NULL, &out, NULL, err) == ST_EINVAL);
    CHECK(chat_template_apply(t, msgs, NULL, true, -1, NULL, NULL, msgs, &out, NULL, err) == ST_EINVAL);
    CHECK(chat_template_render(t, msgs, &out, NULL, err) == ST_EINVAL);
    json_decref(msgs);
    json_decref(tools);
    json_decref(extra);
    chat_template_free(t);
}

/* ---- our documented choices where jinja2 would raise or Python has unbounded ints ---- */

static void test_undefined_chains(void)
{
    char err[ST_ERR_LEN], *out;
    /* attribute and item access on undefined give undefined (jinja2's ChainableUndefined behaviour) */
    REQUIRE(render_text("[{{ foo.bar }}][{{ foo.bar.baz is defined }}][{{ foo['x'][0] }}][{{ (foo.bar or 'd') }}]", "{}", NULL,
                        &out, err) == 0);
    CHECK_STR(out, "[][False][][d]");
    free(out);
    /* ... but using one is an error naming it */
    CHECK(render_text("{{ foo.bar + 1 }}", "{}", NULL, &out, err) == ST_EINVAL);
    CHECK_MSG(strstr(err, "'bar' is undefined") != NULL, "%s", err);
    CHECK(render_text("{{ foo() }}", "{}", NULL, &out, err) == ST_EINVAL);
    CHECK_MSG(strstr(err, "'foo' is undefined") != NULL, "%s", err);
    CHECK(render_text("{{ 2 ** 63 }}", "{}", NULL, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "integer overflow") != NULL, "%s", err);
}

/* ---- errors ---- */

static void test_compile_errors(void)
{
    static const struct {
        const char *src;
        int code;
        const char *msg;
    } cases[] = {
        {"a\nb\n{{ messages|xmlattr }}", ST_EUNSUPPORTED, "chat template line 3 col 13: unsupported filter 'xmlattr'"},
        {"{{ x is palindrome }}", ST_EUNSUPPORTED, "line 1 col 9: unsupported test 'palindrome'"},
        {"{% extends 'base.html' %}", ST_EUNSUPPORTED, "unsupported tag 'extends'"},
        {"{% include 'x' %}", ST_EUNSUPPORTED, "unsupported tag 'include'"},
        {"{% do x.append(1) %}", ST_EUNSUPPORTED, "unsupported tag 'do'"},
        {"{% frobnicate %}", ST_EFORMAT, "unknown tag 'frobnicate'"},
        {"{% if x %}", ST_EFORMAT, "unexpected end of template, expected 'elif' or 'else' or 'endif' (to close 'if')"},
        {"{% for m in messages %}{{ m }}", ST_EFORMAT, "expected 'endfor' or 'else' (to close 'for')"},
        {"{% for m in x %}\n  {% endif %}", ST_EFORMAT, "line 2 col 6: unexpected tag 'endif' (the innermost block that needs to be closed is 'for')"},
        {"{% endfor %}", ST_EFORMAT, "unknown tag 'endfor'"},
        {"{{ x", ST_EFORMAT, "unexpected end of template"},
        {"{{ }}", ST_EFORMAT, "expected an expression"},
        {"{% if %}{% endif %}", ST_EFORMAT, "expected an expression"},
        {"{{ 1 + }}", ST_EFORMAT, "unexpected 'end of print statement'"},
        {"{{ (1 }}", ST_EFORMAT, "unexpected '}', expected ')'"},
        {"{{ [1, 2) }}", ST_EFORMAT, "unexpected ')', expected ']'"},
        {"{{ 'unterminated }}", ST_EFORMAT, "unterminated string literal"},
        {"{{ 1 $ 2 }}", ST_EFORMAT, "unexpected char '$'"},
        {"{# never closed", ST_EFORMAT, "missing end of comment tag"},
        {"{% raw %}never closed", ST_EFORMAT, "missing end of raw directive"},
        {"{% macro m(a=1, b) %}{% endmacro %}", ST_EFORMAT, "non-default argument follows default argument"},
        {"{% set 1 = 2 %}", ST_EFORMAT, "can't assign"},
        {"{% break %}", ST_EFORMAT, "'break' outside of a loop"},
        {"{% for x in y %}{% macro m() %}{% continue %}{% endmacro %}{% endfor %}", ST_EFORMAT, "'continue' outside of a loop"},
        {"{% call m %}{% endcall %}", ST_EFORMAT, "expected call"},
        {"{{ x is defined is defined }}", ST_EFORMAT, "You cannot chain multiple tests with is"},
        {"{{ 99999999999999999999 }}", ST_ERANGE, "integer literal too large"},
        {"{{ '\\x4' }}", ST_EFORMAT, "truncated \\x escape"},
        {"{{ '\\ud800' }}", ST_EFORMAT, "illegal Unicode character"},
        {"{{ x|default(1, }}", ST_EFORMAT, "expected"},
        {"{{ f(a=1, 2) }}", ST_EFORMAT, "invalid syntax for function call expression"},
        {"{% set x %}unclosed", ST_EFORMAT, "expected 'endset'"},
        {"{% block a required %}{% endblock %}", ST_EFORMAT, "required blocks"},
        {"{% if true %}{% else %}{% elif x %}{% endif %}", ST_EFORMAT, "unexpected tag 'elif'"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        struct chat_template *t = (struct chat_template *)1;
        char err[ST_ERR_LEN] = "";
        int rc = chat_template_compile(&t, cases[i].src, err);
        CHECK_MSG(rc == cases[i].code, "\"%s\": rc %d, want %d (%s)", cases[i].src, rc, cases[i].code, err);
        CHECK_MSG(t == NULL, "\"%s\": *out not cleared", cases[i].src);
        CHECK_MSG(strstr(err, cases[i].msg) != NULL, "\"%s\": message \"%s\" lacks \"%s\"", cases[i].src, err, cases[i].msg);
        if (rc == 0) chat_template_free(t);
    }
    /* invalid UTF-8 and NULL */
    struct chat_template *t;
    char err[ST_ERR_LEN];
    CHECK(chat_template_compile(&t, "ok \xff\xfe", err) == ST_EFORMAT && strstr(err, "UTF-8"));
    CHECK(chat_template_compile(&t, "\xc0\x80", err) == ST_EFORMAT);
    CHECK(chat_template_compile(&t, NULL, err) == ST_EINVAL);
    CHECK(chat_template_compile(&t, "fine", NULL) == 0);
    chat_template_free(t);
    chat_template_free(NULL);
}

static void test_render_errors(void)
{
    static const struct {
        const char *src;
        int code;
        const char *msg;
    } cases[] = {
        {"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}", ST_EINVAL,
         "Conversation roles must alternate user/assistant/user/assistant/..."},
        {"{{ 1 / 0 }}", ST_EINVAL, "line 1 col 6: division by zero"},
        {"{{ 1 // 0 }}", ST_EINVAL, "integer division or modulo by zero"},
        {"{{ 'a' + 1 }}", ST_EINVAL, "unsupported operand type(s) for +: 'str' and 'int'"},
        {"{{ none < 1 }}", ST_EINVAL, "'<' not supported between instances of 'NoneType' and 'int'"},
        {"{{ undefined_thing + 1 }}", ST_EINVAL, "'undefined_thing' is undefined"},
        {"{{ undefined_thing|tojson }}", ST_EINVAL, "Object of type Undefined is not JSON serializable"},
        {"{{ [1, 2][::0] }}", ST_EINVAL, "slice step cannot be zero"},
        {"{{ 5() }}", ST_EINVAL, "'int' object is not callable"},
        {"{% for x in 5 %}{% endfor %}", ST_EINVAL, "'int' object is not iterable"},
        {"{% set a, b = [1] %}", ST_EINVAL, "not enough values to unpack (expected 2, got 1)"},
        {"{% set a, b = [1, 2, 3] %}", ST_EINVAL, "too many values to unpack (expected 2)"},
        {"{% set x = 1 %}{% set x.y = 2 %}", ST_EINVAL, "cannot assign attribute on non-namespace object 'x'"},
        {"{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", ST_EINVAL, "macro 'm' takes not more than 1 argument(s)"},
        {"{% macro m(a) %}{% endmacro %}{{ m(b=2) }}", ST_EINVAL, "macro 'm' takes no keyword argument 'b'"},
        {"{% macro m(a) %}{% endmacro %}{{ m(1, a=2) }}", ST_EINVAL, "got multiple values for argument 'a'"},
        {"{{ [].append(1) }}", ST_EUNSUPPORTED, "unsupported method 'append' of 'list' object"},
        {"{{ 'x'.encode() }}", ST_EUNSUPPORTED, "unsupported method 'encode' of 'str' object"},
        {"{{ 'x'.split('') }}", ST_EINVAL, "empty separator"},
        {"{{ 'a'|join(1, 2, 3) }}", ST_EINVAL, "join takes at most 2 argument(s)"},
        {"{{ 'a'|replace('a', 'b', count='x') }}", ST_EINVAL, "count must be an integer"},
        {"{{ x|dictsort }}", ST_EINVAL, "dictsort expects a mapping"},
        {"{{ 5|items }}", ST_EINVAL, "Can only get item pairs from a mapping."},
        {"{{ range(1000000) }}", ST_ERANGE, "Range too big"},
        {"{{ range(1, 2, 0) }}", ST_EINVAL, "must not be zero"},
        {"{{ '%d' % 'x' }}", ST_EINVAL, "a real number is required"},
        {"{{ '%s %s' % ('a',) }}", ST_EINVAL, "not enough arguments for format string"},
        {"{{ '%s' % ('a', 'b') }}", ST_EINVAL, "not all arguments converted"},
        {"{{ [1, 'a']|sort }}", ST_EINVAL, "'<' not supported between instances of 'str' and 'int'"},
        {"{{ loop() }}", ST_EINVAL, "'loop' is undefined"},
        {"{% for x in [1] %}{{ loop([2]) }}{% endfor %}", ST_EINVAL, "recursive"},
        {"{{ 'a' in 5 }}", ST_EINVAL, "argument of type 'int' is not iterable"},
        {"{{ 1 in 'abc' }}", ST_EINVAL, "'in <string>' requires string as left operand"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char err[ST_ERR_LEN], *out = (char *)1;
        int rc = render_text(cases[i].src, "{\"x\": [1]}", NULL, &out, err);
        CHECK_MSG(rc == cases[i].code, "\"%s\": rc %d, want %d (%s)", cases[i].src, rc, cases[i].code, err);
        CHECK_MSG(out == NULL, "\"%s\": output on error", cases[i].src);
        CHECK_MSG(strstr(err, cases[i].msg) != NULL, "\"%s\": message \"%s\" lacks \"%s\"", cases[i].src, err, cases[i].msg);
        if (rc == 0) free(out);
    }
    /* an unknown or unsupported filter inside an if (a jinja2 "soft frame") fails only when it runs */
    char err2[ST_ERR_LEN], *out2;
    CHECK(render_text("{% if x is string %}{{ x|xmlattr }}{% endif %}ok", "{\"x\": [1]}", NULL, &out2, err2) == 0);
    CHECK_STR(out2, "ok");
    free(out2);
    CHECK(render_text("{% if x %}\n{{ x|xmlattr }}{% endif %}ok", "{\"x\": [1]}", NULL, &out2, err2) == ST_EUNSUPPORTED);
    CHECK_STR(err2, "chat template line 2 col 6: unsupported filter 'xmlattr'");
    /* raise_exception passes its message through unchanged, like Hugging Face's TemplateError */
    char err[ST_ERR_LEN], *out;
    CHECK(render_text("{% if messages[0].role != 'user' %}{{ raise_exception('First message must be from the user') }}{% endif %}ok",
                      "{\"messages\": [{\"role\": \"assistant\"}]}", NULL, &out, err) == ST_EINVAL);
    CHECK_STR(err, "First message must be from the user");
    CHECK(render_text("{% if messages[0].role != 'user' %}{{ raise_exception('x') }}{% endif %}ok",
                      "{\"messages\": [{\"role\": \"user\"}]}", NULL, &out, err) == 0);
    CHECK_STR(out, "ok");
    free(out);
}

static void test_strftime_now(void)
{
    char err[ST_ERR_LEN], *out, want[3][64];
    for (int attempt = 0; attempt < 3; attempt++) {
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        strftime(want[0], sizeof(want[0]), "%d %b %Y", &tm);
        REQUIRE(render_text("{{ strftime_now('%d %b %Y') }}", NULL, NULL, &out, err) == 0);
        now = time(NULL);
        localtime_r(&now, &tm);
        strftime(want[1], sizeof(want[1]), "%d %b %Y", &tm);
        bool ok = strcmp(out, want[0]) == 0 || strcmp(out, want[1]) == 0;
        bool stable = strcmp(want[0], want[1]) == 0;
        if (ok || !stable) {
            CHECK_MSG(ok, "strftime_now gave \"%s\", want \"%s\"", out, want[0]);
            free(out);
            break;
        }
        free(out);
        CHECK_MSG(false, "strftime_now gave a different date");
        break;
    }
    REQUIRE(render_text("[{{ strftime_now('') }}]", NULL, NULL, &out, err) == 0);
    CHECK_STR(out, "[]");
    free(out);
}

/* ---- limits and hostile templates ---- */

static void test_limits(void)
{
    struct chat_template_limits lim;
    char err[ST_ERR_LEN], *out;
    chat_template_default_limits(&lim);
    CHECK(lim.max_output_bytes == 16u << 20 && lim.max_loop_iters == 1000000 && lim.max_depth > 0);

    chat_template_default_limits(&lim);
    lim.max_output_bytes = 1000;
    CHECK(render_text("{% for i in range(100) %}0123456789abcdef{% endfor %}", NULL, &lim, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "exceeds the 1000 byte limit") != NULL, "%s", err);
    CHECK(render_text("{% set s = 'x' * 2000 %}", NULL, &lim, &out, err) == ST_ERANGE);
    CHECK(render_text("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", NULL,
                      &lim, &out, err) == ST_ERANGE);
    CHECK(render_text("{% for i in range(10) %}0123456789{% endfor %}", NULL, &lim, &out, err) == 0);
    free(out);

    chat_template_default_limits(&lim);
    lim.max_loop_iters = 500;
    CHECK(render_text("{% for a in range(100) %}{% for b in range(100) %}{% endfor %}{% endfor %}", NULL, &lim, &out,
                      err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "more than 500 loop iterations") != NULL, "%s", err);

    chat_template_default_limits(&lim);
    lim.max_steps = 20000;
    CHECK(render_text("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                      NULL, &lim, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "over 20000 evaluation steps") != NULL, "%s", err);

    chat_template_default_limits(&lim);
    lim.max_work_bytes = 1 << 20;
    CHECK(render_text("{% set ns = namespace(l=[]) %}{% for i in range(10000) %}{% set ns.l = ns.l + [i] %}{% endfor %}",
                      NULL, &lim, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "too much work") != NULL, "%s", err);

    /* infinite recursion stops at the depth limit (the default one, and a smaller one) */
    CHECK(render_text("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", NULL, NULL, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "recursion deeper than") != NULL, "%s", err);
    chat_template_default_limits(&lim);
    lim.max_depth = 50;
    CHECK(render_text("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, &lim, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "recursion deeper than 50 levels") != NULL, "%s", err);
}

/* Builds a string of n copies of piece between prefix and suffix. */
static char *repeat(const char *prefix, const char *piece, int n, const char *suffix)
{
    size_t pl = strlen(prefix), l = strlen(piece), sl = strlen(suffix);
    char *s = malloc(pl + l * (size_t)n + sl + 1);
    if (!s) return NULL;
    memcpy(s, prefix, pl);
    for (int i = 0; i < n; i++) memcpy(s + pl + l * (size_t)i, piece, l);
    memcpy(s + pl + l * (size_t)n, suffix, sl + 1);
    return s;
}

static void test_hostile_sources(void)
{
    /* nesting in the source is bounded at compile time, however it is spelled */
    static const struct {
        const char *prefix, *piece;
        int n;
        const char *suffix;
    } deep[] = {
        {"{{ ", "(", 5000, "1 }}"},
        {"{{ ", "[", 5000, "1 }}"},
        {"{{ ", "-", 5000, "1 }}"},
        {"{{ ", "not ", 5000, "1 }}"},
        {"{{ x", ".a", 20000, " }}"},
        {"{{ x", "[0]", 20000, " }}"},
        {"{{ 1", " + 1", 20000, " }}"},
        {"{{ 1", "|string", 20000, " }}"},
        {"{{ 1", " if 1", 5000, " }}"},
        {"{{ 1", " and 1", 20000, " }}"},
        {"{{ f", "()", 20000, " }}"},
        {"", "{% if 1 %}", 2000, ""},
        {"", "{% for x in y %}", 2000, ""},
        {"{% if 0 %}", "{% elif 0 %}", 5000, "{% endif %}"},
        {"{% macro m() %}{{ x", ".a", 20000, " }}{% endmacro %}"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(deep); i++) {
        char *src = repeat(deep[i].prefix, deep[i].piece, deep[i].n, deep[i].suffix);
        REQUIRE(src);
        struct chat_template *t = NULL;
        char err[ST_ERR_LEN] = "";
        int rc = chat_template_compile(&t, src, err);
        CHECK_MSG(rc == ST_ERANGE && (strstr(err, "nested deeper") || strstr(err, "brackets nested")),
                  "deep case %zu (%s): rc %d: %s", i, deep[i].piece, rc, err);
        chat_template_free(t);
        free(src);
    }
    /* long but flat is fine */
    char *src = repeat("{{ [", "1, ", 20000, "1]|length }}");
    char err[ST_ERR_LEN], *out;
    REQUIRE(src);
    CHECK(render_text(src, NULL, NULL, &out, err) == 0);
    CHECK_STR(out, "20001");
    free(out);
    free(src);
    src = repeat("{{ 0", " ~ 1 * 1", 20000, " }}");
    REQUIRE(src);
    CHECK(render_text(src, NULL, NULL, &out, err) == 0);
    CHECK(out && strlen(out) == 20001);
    free(out);
    free(src);
    src = repeat("", "{% if true %}a{% endif %}\n", 20000, "");
    REQUIRE(src);
    CHECK(render_text(src, NULL, NULL, &out, err) == 0);
    CHECK(out && strlen(out) == 20000 && out[0] == 'a' && out[19999] == 'a');
    free(out);
    free(src);
}

static void test_hostile_values(void)
{
    char err[ST_ERR_LEN], *out;
    /* a very deep value is built and released without deep recursion */
    CHECK(render_text("{% set ns = namespace(x=[]) %}{% for i in range(50000) %}{% set ns.x = [ns.x, {'k': ns.x}] %}{% endfor %}ok",
                      NULL, NULL, &out, err) == 0);
    CHECK_STR(out, "ok");
    free(out);
    /* printing or serializing it is refused, as are cycles through namespaces */
    CHECK(render_text("{% set ns = namespace(x=[]) %}{% for i in range(500) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
                      NULL, NULL, &out, err) == ST_EINVAL);
    CHECK_MSG(strstr(err, "nested deeper") != NULL, "%s", err);
    CHECK(render_text("{% set ns = namespace(x=[]) %}{% for i in range(500) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x|tojson }}",
                      NULL, NULL, &out, err) == ST_EINVAL);
    CHECK(render_text("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", NULL, NULL, &out, err) == ST_EINVAL);
    CHECK(render_text("{% set ns = namespace() %}{% set ns.me = [ns] %}{{ ns.me == ns.me }}", NULL, NULL, &out, err) == 0);
    CHECK_STR(out, "True");
    free(out);
    /* macros stored in the scope they close over (a cycle) are released at the end of the render */
    CHECK(render_text("{% for i in range(3) %}{% macro m() %}{{ i }}{% endmacro %}{% set ns = namespace(f=m) %}{{ ns.f() }}{% endfor %}",
                      NULL, NULL, &out, err) == 0);
    CHECK_STR(out, "012");
    free(out);
    /* deep JSON input is refused, not recursed into forever */
    char *deep = repeat("{\"v\": ", "[", 1000, "");
    REQUIRE(deep);
    size_t dl = strlen(deep);
    char *vars = malloc(dl + 1000 + 2);
    REQUIRE(vars);
    memcpy(vars, deep, dl);
    memset(vars + dl, ']', 1000);
    strcpy(vars + dl + 1000, "}");
    CHECK(render_text("{{ v|length }}", vars, NULL, &out, err) == ST_ERANGE);
    CHECK_MSG(strstr(err, "nested too deeply") != NULL, "%s", err);
    free(vars);
    free(deep);
}

/* ---- concurrency: one compiled template, many renders at once ---- */

struct thread_arg {
    const struct chat_template *t;
    const json_t *msgs, *tools;
    const char *want;
    int mismatches;
};

static void *render_thread(void *p)
{
    struct thread_arg *a = p;
    for (int i = 0; i < 40; i++) {
        char err[ST_ERR_LEN], *out = NULL;
        if (chat_template_apply(a->t, a->msgs, a->tools, false, -1, NULL, "<|im_end|>", NULL, &out, NULL, err) != 0 ||
            strcmp(out, a->want) != 0)
            a->mismatches++;
        free(out);
    }
    return NULL;
}

static void test_concurrent_renders(void)
{
    char *src = fixture_template("models/kjv-qwen3-21m-8bit/tokenizer_config.json", NULL);
    if (!src) SKIP("fixtures missing (run make fixtures)");
    struct chat_template *t = NULL;
    char err[ST_ERR_LEN];
    REQUIRE_MSG(chat_template_compile(&t, src, err) == 0, "%s", err);
    json_t *msgs = parse(qwen_m1_json), *tools = parse(qwen_tools_json);
    REQUIRE(msgs && tools);
    pthread_t th[4];
    struct thread_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct thread_arg){.t = t, .msgs = msgs, .tools = tools, .want = qwen_exp1};
        REQUIRE(pthread_create(&th[i], NULL, render_thread, &args[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_INT(args[i].mismatches, 0);
    }
    json_decref(msgs);
    json_decref(tools);
    chat_template_free(t);
    free(src);
}

static void test_empty_and_plain(void)
{
    char err[ST_ERR_LEN], *out;
    size_t len = 99;
    struct chat_template *t;
    REQUIRE(chat_template_compile(&t, "", err) == 0);
    REQUIRE(chat_template_render(t, NULL, &out, &len, err) == 0);
    CHECK(out != NULL && len == 0 && out[0] == 0);
    free(out);
    chat_template_free(t);
    /* embedded NUL from JSON input survives, and out_len counts it */
    REQUIRE(chat_template_compile(&t, "[{{ s }}]", err) == 0);
    json_t *v = json_pack("{s:s%}", "s", "a\0b", (size_t)3);
    REQUIRE(v);
    REQUIRE(chat_template_render(t, v, &out, &len, err) == 0);
    CHECK(len == 5 && memcmp(out, "[a\0b]", 5) == 0);
    free(out);
    json_decref(v);
    chat_template_free(t);
}

int main(void)
{
    RUN(test_constructs);
    RUN(test_golden_chat_templates);
    RUN(test_golden_kjv_chat);
    RUN(test_qwen3_multiturn_tools);
    RUN(test_apply_variables);
    RUN(test_undefined_chains);
    RUN(test_compile_errors);
    RUN(test_render_errors);
    RUN(test_strftime_now);
    RUN(test_limits);
    RUN(test_hostile_sources);
    RUN(test_hostile_values);
    RUN(test_concurrent_renders);
    RUN(test_empty_and_plain);
    return check_done();
}
