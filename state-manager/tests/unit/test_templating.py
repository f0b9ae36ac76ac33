import pytest
from state_manager.domain.templating import (
    OutputRef,
    ParsedTemplate,
    Placeholder,
    StoreRef,
    TemplateError,
    parse,
    render,
    render_text,
)


def test_plain_text_has_no_parts() -> None:
    assert parse("hello }} world") == ParsedTemplate("hello }} world", ())


def test_empty_string() -> None:
    assert parse("") == ParsedTemplate("", ())


def test_output_reference_with_head_and_tail() -> None:
    parsed = parse("x=${{ a.outputs.b }}!")
    assert parsed == ParsedTemplate("x=", ((OutputRef("a", "b"), "!"),))


def test_whitespace_around_parts_is_ignored() -> None:
    assert parse("${{a . outputs . b}}").references() == [OutputRef("a", "b")]


def test_store_reference() -> None:
    assert parse("${{ store.key }}").references() == [StoreRef("key")]


def test_store_outputs_quirk_is_a_store_reference() -> None:
    assert parse("${{ store.outputs.k }}").references() == [StoreRef("k")]


def test_tail_keeps_further_closing_braces() -> None:
    parsed = parse("${{ a.outputs.b }} }} ${{ store.k }}end")
    assert parsed.parts == (
        (OutputRef("a", "b"), " }} "),
        (StoreRef("k"), "end"),
    )


def test_references_keep_order_and_duplicates() -> None:
    parsed = parse("${{ b.outputs.x }}${{ a.outputs.y }}${{ b.outputs.x }}")
    assert parsed.references() == [OutputRef("b", "x"), OutputRef("a", "y"), OutputRef("b", "x")]


def test_unclosed_placeholder() -> None:
    with pytest.raises(TemplateError, match=r"not closed.*\$\{\{ a\.outputs\.b"):
        parse("start ${{ a.outputs.b")


def test_unclosed_second_placeholder() -> None:
    with pytest.raises(TemplateError, match="not closed"):
        parse("${{ store.a }} and ${{ store.b")


@pytest.mark.parametrize(
    "body",
    [
        "a",
        "a.b",
        "a.inputs.b",
        "a.outputs.b.c",
        "store.a.b",
        "outputs.a",
        "",
        "x.outputs",
    ],
)
def test_invalid_bodies_are_rejected_and_quoted(body: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse(f"pre ${{{{{body}}}}} post")
    assert f"'${{{{{body}}}}}'" in str(info.value)


@pytest.mark.parametrize("body", [" .outputs.b", "a.outputs. ", "store. ", "store.outputs. "])
def test_empty_names_are_rejected(body: str) -> None:
    with pytest.raises(TemplateError, match="non-empty"):
        parse("${{" + body + "}}")


def test_literal_dollar_braces_cannot_be_escaped() -> None:
    with pytest.raises(TemplateError):
        parse("price: ${{ 5 }}")


def test_template_error_is_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


def _resolver(values: dict[Placeholder, object]):  # type: ignore[no-untyped-def]
    return lambda ref: values[ref]


def test_render_substitutes_in_order() -> None:
    values: dict[Placeholder, object] = {OutputRef("a", "x"): "1", StoreRef("k"): "two"}
    text = "<${{ a.outputs.x }}|${{ store.k }}|${{a.outputs.x}}>"
    assert render_text(text, _resolver(values)) == "<1|two|1>"


def test_render_without_placeholders_does_not_resolve() -> None:
    def resolve(ref: Placeholder) -> object:
        raise AssertionError("must not be called")

    assert render(parse("plain"), resolve) == "plain"


def test_render_rejects_non_string_value_naming_reference() -> None:
    with pytest.raises(TemplateError, match=r"a\.outputs\.x.*int"):
        render_text("${{ a.outputs.x }}", lambda ref: 5)


def test_render_rejects_none() -> None:
    with pytest.raises(TemplateError, match=r"store\.k"):
        render_text("${{ store.k }}", lambda ref: None)


def test_render_propagates_resolver_errors() -> None:
    def resolve(ref: Placeholder) -> object:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        render_text("${{ store.k }}", resolve)
