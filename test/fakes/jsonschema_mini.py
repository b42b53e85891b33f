"""A small JSON Schema validator (stdlib only).

Covers what the APM intake v2 schemas use (draft-07 style): type (string or
list, incl. "null" and "integer"), enum, const, properties, patternProperties,
additionalProperties, required, minProperties/maxProperties, items (schema or
list), minItems/maxItems, uniqueItems, minLength/maxLength (characters),
pattern (unanchored, like re.search), minimum/maximum, exclusiveMinimum/
exclusiveMaximum (draft-4 boolean and draft-6 number forms), multipleOf,
allOf/anyOf/oneOf/not, if/then/else and local "$ref" ("#/..." pointers).
Unknown keywords ($id, description, format...) are ignored.

    validate(instance, schema) -> list[str]   # [] means valid
"""
import re

__all__ = ["validate", "is_valid"]

_re_cache = {}


def _regex(pattern):
    rx = _re_cache.get(pattern)
    if rx is None:
        rx = _re_cache[pattern] = re.compile(pattern)
    return rx


def _is_type(value, name):
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return True  # unknown type name: do not complain


def _type_name(value):
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name):
            return name
    return type(value).__name__


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _child(path, key):
    if isinstance(key, int):
        return "%s[%d]" % (path, key)
    if _IDENT.match(key):
        return "%s.%s" % (path, key)
    return "%s[%r]" % (path, key)


def _equal(a, b):
    # JSON equality: 1 == 1.0 but True != 1
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) == type(b) and a == b or (
        _is_type(a, "number") and _is_type(b, "number") and a == b)


def _resolve(root, ref):
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/"):
        if part == "":
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node[part]
    return node


def validate(instance, schema, path="$", _root=None):
    """Return a list of error messages ('<json path>: <problem>')."""
    root = schema if _root is None else _root
    errs = []
    if schema is True or schema == {}:
        return errs
    if schema is False:
        return ["%s: no value allowed here" % path]
    if not isinstance(schema, dict):
        return errs

    def err(msg):
        errs.append("%s: %s" % (path, msg))

    def sub(inst, sch, p=path):
        return validate(inst, sch, p, root)

    if "$ref" in schema:
        try:
            target = _resolve(root, schema["$ref"])
        except (KeyError, IndexError, ValueError):
            target = None
        if target is not None:
            errs.extend(sub(instance, target))

    # --- generic keywords
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            err("expected type %s, got %s" % ("|".join(types), _type_name(instance)))
            return errs  # further checks would only add noise
    if "enum" in schema and not any(_equal(instance, e) for e in schema["enum"]):
        err("value %r not in enum %r" % (instance, schema["enum"]))
    if "const" in schema and not _equal(instance, schema["const"]):
        err("value %r is not %r" % (instance, schema["const"]))

    # --- strings
    if isinstance(instance, str):
        n = len(instance)  # characters, not bytes
        if "maxLength" in schema and n > schema["maxLength"]:
            err("string longer than %d characters (%d)" % (schema["maxLength"], n))
        if "minLength" in schema and n < schema["minLength"]:
            err("string shorter than %d characters (%d)" % (schema["minLength"], n))
        if "pattern" in schema and not _regex(schema["pattern"]).search(instance):
            err("string %r does not match pattern %r" % (instance, schema["pattern"]))

    # --- numbers
    if _is_type(instance, "number"):
        if "minimum" in schema:
            if schema.get("exclusiveMinimum") is True:
                if instance <= schema["minimum"]:
                    err("%r <= exclusive minimum %r" % (instance, schema["minimum"]))
            elif instance < schema["minimum"]:
                err("%r < minimum %r" % (instance, schema["minimum"]))
        if "maximum" in schema:
            if schema.get("exclusiveMaximum") is True:
                if instance >= schema["maximum"]:
                    err("%r >= exclusive maximum %r" % (instance, schema["maximum"]))
            elif instance > schema["maximum"]:
                err("%r > maximum %r" % (instance, schema["maximum"]))
        xmin, xmax = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if _is_type(xmin, "number") and instance <= xmin:
            err("%r <= exclusive minimum %r" % (instance, xmin))
        if _is_type(xmax, "number") and instance >= xmax:
            err("%r >= exclusive maximum %r" % (instance, xmax))
        mult = schema.get("multipleOf")
        if _is_type(mult, "number") and mult > 0:
            q = instance / mult
            if abs(q - round(q)) > 1e-9:
                err("%r is not a multiple of %r" % (instance, mult))

    # --- arrays
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            err("fewer than %d items (%d)" % (schema["minItems"], len(instance)))
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            err("more than %d items (%d)" % (schema["maxItems"], len(instance)))
        items = schema.get("items")
        if isinstance(items, list):
            for i, (v, s) in enumerate(zip(instance, items)):
                errs.extend(sub(v, s, _child(path, i)))
            extra = schema.get("additionalItems")
            if extra is not None:
                for i in range(len(items), len(instance)):
                    errs.extend(sub(instance[i], extra, _child(path, i)))
        elif items is not None:
            for i, v in enumerate(instance):
                errs.extend(sub(v, items, _child(path, i)))
        if schema.get("uniqueItems"):
            for i in range(len(instance)):
                if any(_equal(instance[i], instance[j]) for j in range(i)):
                    err("items are not unique (index %d)" % i)
                    break

    # --- objects
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                err("missing required property %r" % key)
        if "minProperties" in schema and len(instance) < schema["minProperties"]:
            err("fewer than %d properties" % schema["minProperties"])
        if "maxProperties" in schema and len(instance) > schema["maxProperties"]:
            err("more than %d properties" % schema["maxProperties"])
        props = schema.get("properties", {})
        pprops = schema.get("patternProperties", {})
        addl = schema.get("additionalProperties", True)
        for key, value in instance.items():
            matched = False
            if key in props:
                matched = True
                errs.extend(sub(value, props[key], _child(path, key)))
            for pat, psch in pprops.items():
                if _regex(pat).search(key):
                    matched = True
                    errs.extend(sub(value, psch, _child(path, key)))
            if not matched:
                if addl is False:
                    err("additional property %r not allowed" % key)
                elif isinstance(addl, dict):
                    errs.extend(sub(value, addl, _child(path, key)))

    # --- combinators
    for i, s in enumerate(schema.get("allOf", ())):
        errs.extend(sub(instance, s))
    if "anyOf" in schema:
        results = [sub(instance, s) for s in schema["anyOf"]]
        if all(results):
            err("matches none of anyOf: " + " | ".join("; ".join(r) for r in results))
    if "oneOf" in schema:
        ok = sum(1 for s in schema["oneOf"] if not sub(instance, s))
        if ok != 1:
            err("matches %d of oneOf (expected exactly 1)" % ok)
    if "not" in schema and not sub(instance, schema["not"]):
        err("must not match 'not' schema")
    if "if" in schema:
        branch = "then" if not sub(instance, schema["if"]) else "else"
        if branch in schema:
            errs.extend(sub(instance, schema[branch]))
    return errs


def is_valid(instance, schema):
    return not validate(instance, schema)
