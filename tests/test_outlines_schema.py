"""The rewriting of JSON schemas into what outlines-core enforces exactly
(`dotllm.compiler.outlines_schema`), what no engine enforces (`enforcement`) and what a
non-strict request is served (`relaxation`).

Each construct outlines-core got wrong is checked on the index it compiles to: the
documents it must allow, and the ones it wrote before (which break the schema) it must
not. The soundness fuzzer (bench/soundness.py, tests/test_soundness.py) checks what the
indexes generate.
"""

from __future__ import annotations

import pytest

from dotllm.compiler import lexer_probe
from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.enforcement import Unenforced, never_enforced, relax
from dotllm.compiler.outlines_schema import NotForOutlines, normalize, to_outlines
from dotllm.compiler.relaxation import serve
from dotllm.compiler.spec import ConstraintError, ConstraintSpec


@pytest.fixture(scope="module")
def allows(tokenizer, vocabulary):
    """allows(schema, text): does the compiled index accept `text` and then EOS?"""
    def allows(schema, text: str) -> bool:
        spec = ConstraintSpec.json_schema(schema)
        index = CompiledIndex.for_spec(spec, vocabulary)
        state = index.initial_state
        for token in tokenizer.encode(text, add_special_tokens=False):
            if (state := index.next_state(state, token)) is None:
                return False
        return index.is_final(state)

    return allows


A_AND_B = {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                     {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}


def test_all_of_is_one_object_not_two_documents(allows):
    assert allows(A_AND_B, '{"a": 5, "b": -7}')
    assert not allows(A_AND_B, '{"a": 5}{"b": -7}')  # what outlines-core wrote
    assert not allows(A_AND_B, '{"a": 5}')


ONE_OF_REQUIRED = {"type": "object", "additionalProperties": False,
                   "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                   "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}


def test_one_of_beside_properties_is_enforced_exactly(allows):
    """o10011/o10013 of Github_easy: outlines-core dropped the oneOf and wrote `{}`."""
    assert allows(ONE_OF_REQUIRED, '{"a": "x"}') and allows(ONE_OF_REQUIRED, '{"b": "y"}')
    assert not allows(ONE_OF_REQUIRED, "{}")
    assert not allows(ONE_OF_REQUIRED, '{"a": "x", "b": "y"}')  # both branches match


def test_one_of_that_may_overlap_is_not_for_outlines():
    with pytest.raises(NotForOutlines, match="oneOf at /: branches 0 and 1") as info:
        normalize({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]})
    assert (info.value.keyword, info.value.pointer) == ("oneOf", "")
    assert normalize({"oneOf": [{"type": "string"}, {"type": "integer"}]}) == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]}
    tagged = {"oneOf": [
        {"properties": {"kind": {"const": "a"}, "x": {}}, "required": ["kind"]},
        {"properties": {"kind": {"const": "b"}, "y": {}}, "required": ["kind"]}]}
    assert set(normalize(tagged)) == {"anyOf"}  # told apart by a discriminator


def test_required_names_not_declared_mean_what_json_schema_says(allows):
    """o10337: `required: ["top"]` with empty `properties` gave `{}` on both engines."""
    schema = {"type": "object", "properties": {}, "required": ["top"]}
    assert to_outlines(schema)["required"] == ["top"]  # any value: slow to compile here
    typed = {"properties": {}, "required": ["n"], "additionalProperties": {"type": "integer"}}
    assert allows(typed, '{"n": 3}') and not allows(typed, '{"n": "x"}')
    with pytest.raises(ConstraintError, match="no JSON value can satisfy"):
        normalize({"properties": {}, "required": ["n"], "additionalProperties": False})


def test_a_ref_to_itself_describing_no_value_is_a_client_error():
    with pytest.raises(ConstraintError, match="refers back to itself"):
        normalize({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    with pytest.raises(ConstraintError, match="points to nothing"):
        normalize({"properties": {"a": {"$ref": "#/$defs/missing"}}})


def test_recursion_is_unrolled_and_cut_only_where_a_value_may_be_left_out(allows):
    tree = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "maxLength": 3},
        "kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert allows(tree, '{"name": "a", "kids": [{"name": "b", "kids": []}]}')
    assert allows(tree, '{"name": "a"}')
    chain = {"$defs": {"n": {"type": "object", "required": ["next"],
                             "properties": {"next": {"$ref": "#/$defs/n"}}}},
             "$ref": "#/$defs/n"}  # no way to stop: nothing can be left out
    with pytest.raises(NotForOutlines, match="recurses past"):
        normalize(chain)


def test_deep_refs_are_inlined_not_dropped(allows):
    """outlines-core dropped a property whose $ref chain was over three deep."""
    schema = {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(5)},
              "type": "object", "required": ["v"], "properties": {"v": {"$ref": "#/$defs/d0"}}}
    schema["$defs"]["d5"] = {"type": "boolean"}
    assert allows(schema, '{"v": true}') and not allows(schema, "{}")


def test_strings_take_one_pattern_read_as_ecma(allows):
    digits = {"type": "string", "pattern": r"^\d+$"}
    assert allows(digits, '"123"') and not allows(digits, '"۰١"')
    dotted = {"type": "string", "pattern": "^a.b$"}
    assert allows(dotted, '"a\\"b"') and not allows(dotted, '"a"b"')
    with pytest.raises(NotForOutlines, match="pattern at / beside minLength"):
        normalize({"type": "string", "pattern": "a+", "maxLength": 3})


def test_formats_are_dotllms_own(allows):
    when = {"type": "string", "format": "date-time"}
    assert allows(when, '"2024-02-29T13:45:00Z"')
    assert not allows(when, '"2023-02-29T13:45:00Z"')
    assert not allows(when, '"2024-02-28T13:45:00"')  # outlines-core wrote no time zone
    with pytest.raises(NotForOutlines, match="format at /"):
        normalize({"type": "string", "format": "url"})


def test_integer_bounds_are_a_range_of_the_index(allows):
    """minimum/maximum (exclusive ones, draft 4's booleans, fractional bounds) as integers;
    a number's bounds, or bounds without a type, go to llguidance."""
    age = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18,
                                                     "exclusiveMaximum": 99.5}},
           "required": ["age"]}
    assert allows(age, '{"age": 18}') and allows(age, '{"age": 99}')
    assert not allows(age, '{"age": 17}') and not allows(age, '{"age": 100}')
    assert not allows(age, '{"age": 018}')
    below = {"type": ["integer", "null"], "maximum": -3}
    assert allows(below, "-3") and allows(below, "-120") and allows(below, "null")
    assert not allows(below, "-2") and not allows(below, "0")
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer",
              "minimum": 0, "exclusiveMinimum": True, "maximum": 3}
    assert normalize(draft4) == {"type": "integer", "minimum": 1, "maximum": 3}
    both = {"allOf": [{"type": "integer", "minimum": 2}, {"type": "number", "maximum": 7},
                      {"maximum": 5, "type": "integer"}]}
    with pytest.raises(NotForOutlines, match="maximum at /allOf/1 on a number"):
        normalize(both)
    both["allOf"][1] = {"type": "number"}
    assert normalize(both) == {"type": "integer", "minimum": 2, "maximum": 5}
    assert normalize({"type": "integer", "maximum": 3, "enum": [1, 5, "a"]}) == {"enum": [1]}
    with pytest.raises(ConstraintError, match="no JSON value"):
        normalize({"type": "integer", "minimum": 2.5, "maximum": 2.9})
    with pytest.raises(NotForOutlines, match="past 18 digits"):
        normalize({"type": "integer", "maximum": 1e30})
    with pytest.raises(NotForOutlines, match="marker"):
        normalize({"enum": ["dotllm_integer_1_2"]})
    assert normalize({"type": "string", "minimum": 3}) == {"type": "string"}  # not a number


def test_enum_keeps_only_what_the_rest_allows(allows):
    schema = {"type": "string", "enum": ["a", "bb", 3], "maxLength": 1}
    assert normalize(schema) == {"enum": ["a"]}
    objects = {"enum": [{"x": [1, 2]}, None]}
    assert allows(objects, '{"x": [1, 2]}') and allows(objects, "null")
    assert not allows(objects, '{"x": [1]}')
    with pytest.raises(ConstraintError, match="no JSON value"):
        normalize({"type": "integer", "enum": ["a"]})


def test_siblings_of_any_of_apply_to_every_branch(allows):
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"],
              "anyOf": [{"properties": {"a": {"type": "boolean"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "null"}}, "required": ["b"]}]}
    assert allows(schema, '{"k": 1, "a": true}') and allows(schema, '{"k": 1, "b": null}')
    assert not allows(schema, '{"k": 1}') and not allows(schema, '{"a": true}')


def test_any_value_inside_an_object_stays_inside_it():
    """outlines-core wrote `{}` as an ungrouped alternation: inside a property it split the
    whole regex, and `{"v": true` (unclosed) matched."""
    import re

    regex = ConstraintSpec.json_schema(
        {"type": "object", "properties": {"v": {}}, "required": ["v"]}).to_regex()
    assert re.fullmatch(regex, '{"v": [1, "a"]}') and re.fullmatch(regex, '{"v": null}')
    assert not re.fullmatch(regex, '{"v": true') and not re.fullmatch(regex, "null")


def test_annotations_and_unknown_keywords_are_ignored_as_validators_do():
    assert normalize({"description": "any", "x-extra": {"type": "string"}}) == {}
    assert normalize({"title": "n", "nullable": True, "type": "null"}) == {"type": "null"}


def test_keywords_it_cannot_enforce_go_to_llguidance():
    for schema, where in [({"properties": {"n": {"type": "number", "minimum": 1}}},
                           "minimum at /properties/n on a number"),
                          ({"properties": {"n": {"minimum": 1}}},
                           "minimum at /properties/n without a type"),
                          ({"type": "object", "maxProperties": 2}, "maxProperties at /"),
                          ({"patternProperties": {"^a": {}}}, "patternProperties at /")]:
        with pytest.raises(NotForOutlines, match=where):
            to_outlines(schema)


def test_never_enforced_keywords_are_dropped_by_relax():
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "uniqueItems": True, "items": {"type": "string"}},
        "site": {"type": "string", "format": "url"}},
        "if": {"required": ["tags"]}, "then": {"required": ["site"]}}
    found = never_enforced(schema)
    assert [str(u) for u in found] == ["if at /", "then at /", "uniqueItems at /properties/tags",
                                       "format at /properties/site"]
    relaxed = relax(schema, found)
    assert relaxed == {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}}, "site": {"type": "string"}}}
    assert "if" in schema  # the request's schema is left alone
    assert relax({"oneOf": [{}, {}]}, [Unenforced("oneOf", "")]) == {"anyOf": [{}, {}]}


def test_strict_requests_are_refused_what_is_not_enforced_others_are_told():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(ConstraintError, match="strict JSON schema uses what DotLLM cannot "
                                              "enforce: uniqueItems at /"):
        serve(ConstraintSpec.json_schema(schema), strict=True)
    served = serve(ConstraintSpec.json_schema(schema), strict=False)
    assert [str(u) for u in served.unenforced] == ["uniqueItems at /"]
    assert served.spec.schema == {"type": "array", "items": {"type": "integer"}}
    assert served.original == schema
    plain = serve(ConstraintSpec.json_schema({"type": "integer"}), strict=True)
    assert plain.unenforced == [] and plain.original is None


def test_what_neither_engine_takes_where_it_stands_is_relaxed_if_not_strict():
    """A oneOf outlines-core cannot tell apart and llguidance refuses is read as anyOf."""
    schema = {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}
    with pytest.raises(ConstraintError, match="strict JSON schema: .*oneOf at /"):
        serve(ConstraintSpec.json_schema(schema), strict=True)
    served = serve(ConstraintSpec.json_schema(schema), strict=False)
    assert [str(u) for u in served.unenforced] == ["oneOf at /"]
    assert served.spec.schema == {"anyOf": schema["oneOf"]}
    assert served.spec.outlines_refusal() is None


# A real schema's (Github_easy o21053): llguidance's lexer gave up a few characters into
# the string on 58 of 60 random walks; the pattern alone is cheap.
WORDS = {"type": "string", "pattern": r"^$|(^(?:\S+\s+){0,99}\S+$)",
         "minLength": 1, "maxLength": 5000}


def test_length_bounds_beside_a_pattern_past_llguidances_lexer_are_left_out_if_not_strict():
    schema = {"type": "object", "properties": {"q": WORDS, "n": {
        "type": "string", "pattern": "^[a-z]+$", "maxLength": 8}}, "required": ["q", "n"]}
    with pytest.raises(ConstraintError, match="strict JSON schema: .*pattern at /properties/q "
                                              "with minLength, maxLength: past llguidance's "
                                              "lexer limits"):
        serve(ConstraintSpec.json_schema(schema), strict=True)
    served = serve(ConstraintSpec.json_schema(schema), strict=False)
    assert [str(u) for u in served.unenforced] == ["minLength at /properties/q",
                                                   "maxLength at /properties/q"]
    assert served.spec.schema["properties"]["q"] == {
        "type": "string", "pattern": WORDS["pattern"]}
    assert served.spec.schema["properties"]["n"]["maxLength"] == 8  # llguidance takes it


def test_the_lexer_probe_passes_what_llguidance_takes():
    assert lexer_probe.beyond_lexer(
        {"type": "string", "pattern": r"^\d{3}-[a-z]{2,40}$", "maxLength": 30}) == []
    assert lexer_probe.beyond_lexer({"type": "string", "pattern": WORDS["pattern"]}) == []
    [limit] = lexer_probe.beyond_lexer({"items": WORDS})
    assert limit.pointer == "/items" and "too many expressions" in limit.error
    # Without "type" the bounds still apply to strings; bounds that are not numbers are
    # left to the grammar checks.
    untyped = {k: v for k, v in WORDS.items() if k != "type"}
    assert [x.pointer for x in lexer_probe.beyond_lexer({"items": untyped})] == ["/items"]
    assert lexer_probe.beyond_lexer({"pattern": "^a$", "maxLength": "3"}) == []
