"""20 varied tool sets and prompts, and 20 structured-output specs, for the real server.

Tool sets mix nested objects, enums, arrays, bounded integers, tools without parameters and
several tools per request; each case names the tool_choice it is run with.
"""

from __future__ import annotations


def fn(name: str, description: str, parameters: dict | None = None) -> dict:
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}  # fmt: skip


CITY = {"type": "string", "maxLength": 40}
WEATHER = fn("get_weather", "Get the current weather in a city.",
             obj({"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}}))  # fmt: skip
TIME = fn("get_time", "Get the current time.")
SEARCH = fn("search_web", "Search the web.",
            obj({"query": {"type": "string", "maxLength": 60},
                 "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}))  # fmt: skip
EMAIL = fn("send_email", "Send an email.",
           obj({"to": {"type": "string", "maxLength": 40},
                "subject": {"type": "string", "maxLength": 60},
                "cc": {"type": "array", "items": {"type": "string", "maxLength": 40},
                       "maxItems": 3}},
               required=["to", "subject"]))  # fmt: skip
EVENT = fn("create_event", "Create a calendar event.",
           obj({"title": {"type": "string", "maxLength": 50},
                "when": obj({"date": {"type": "string", "format": "date"},
                             "hour": {"type": "integer", "minimum": 0, "maximum": 23}}),
                "attendees": {"type": "array", "maxItems": 4,
                              "items": obj({"name": {"type": "string", "maxLength": 30},
                                            "optional": {"type": "boolean"}})}}))  # fmt: skip
ORDER = fn("order_pizza", "Order a pizza.",
           obj({"size": {"enum": ["small", "medium", "large"]},
                "toppings": {"type": "array", "items": {"enum": ["cheese", "ham", "olives",
                                                                 "mushrooms"]},
                             "minItems": 1, "maxItems": 4},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 5}}))  # fmt: skip
CONVERT = fn("convert_currency", "Convert an amount between currencies.",
             obj({"amount": {"type": "number", "minimum": 0, "maximum": 1000000},
                  "from": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                  "to": {"enum": ["USD", "EUR", "GBP", "JPY"]}}))  # fmt: skip
LIGHTS = fn("set_lights", "Turn lights on or off in a room.",
            obj({"room": {"enum": ["kitchen", "bedroom", "living room"]}, "on": {"type": "boolean"},
                 "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
                required=["room", "on"]))  # fmt: skip
STOCK = fn(
    "get_stock_price",
    "Get a stock's price.",
    obj({"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}}),
)
TRANSLATE = fn("translate", "Translate text.",
               obj({"text": {"type": "string", "maxLength": 80},
                    "target": {"enum": ["fr", "de", "es", "ja"]}}))  # fmt: skip
REMINDER = fn("set_reminder", "Set a reminder.",
              obj({"message": {"type": "string", "maxLength": 60},
                   "minutes": {"type": "integer", "minimum": 1, "maximum": 1440},
                   "repeat": {"anyOf": [{"type": "null"}, {"enum": ["daily", "weekly"]}]}},
                  required=["message", "minutes"]))  # fmt: skip
ROUTE = fn(
    "plan_route",
    "Plan a route between places.",
    obj(
        {
            "stops": {"type": "array", "minItems": 2, "maxItems": 4, "items": CITY},
            "mode": {"enum": ["car", "bike", "walk", "train"]},
            "avoid": obj({"tolls": {"type": "boolean"}, "highways": {"type": "boolean"}}),
        }
    ),
)
LOOKUP = fn("lookup_user", "Look a user up by id.",
            {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
             "$defs": {}})  # fmt: skip
RATE = fn("rate_movie", "Rate a movie.",
          obj({"title": {"type": "string", "maxLength": 50},
               "stars": {"type": "integer", "minimum": 1, "maximum": 5},
               "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}},
              **{"$defs": {"tag": {"enum": ["funny", "sad", "long", "classic"]}}}))  # fmt: skip
PING = fn("ping", "Check that the service is up.", {"type": "object", "properties": {}})

NAMED = "named"
TOOL_CASES = [
    ([WEATHER], "What's the weather in Paris?", "required"),
    ([WEATHER, TIME], "What time is it?", "required"),
    ([TIME], "Tell me the time.", "required"),
    ([SEARCH], "Find recent news about Mars rovers.", "required"),
    ([EMAIL], "Email bob@example.com that the meeting moved.", "required"),
    ([EVENT], "Schedule lunch with Ana on 2024-05-03 at noon.", "required"),
    ([ORDER], "I'd like two large pizzas with ham and olives.", "required"),
    ([CONVERT], "How much is 250 dollars in euros?", "required"),
    ([LIGHTS, TIME], "Turn on the kitchen lights.", "required"),
    ([STOCK], "What is Apple's stock price?", "required"),
    ([TRANSLATE, SEARCH], "Translate 'good night' to French.", "required"),
    ([REMINDER], "Remind me to stretch in 30 minutes.", "required"),
    ([ROUTE], "Plan a bike trip from Lyon to Annecy.", "required"),
    ([LOOKUP, PING], "Who is user 42?", "required"),
    ([RATE], "I loved Casablanca, five stars.", "required"),
    ([WEATHER, SEARCH, EMAIL, ORDER], "Order a small cheese pizza.", NAMED),
    ([PING, TIME], "Is the service up?", NAMED),
    ([EVENT, REMINDER], "Team meeting next Monday at 9.", NAMED),
    ([CONVERT, STOCK, TRANSLATE], "Convert 10 GBP to JPY.", NAMED),
    ([ROUTE, LIGHTS, WEATHER], "Drive from Rome to Naples avoiding tolls.", NAMED),
]

PERSON = obj({"name": {"type": "string", "maxLength": 30},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             additionalProperties=False)  # fmt: skip

# (kind, spec, prompt): kind is json_schema (strict), json_object, regex or choice.
STRUCTURED_CASES = [
    ("json_schema", PERSON, "Describe a person."),
    (
        "json_schema",
        obj(
            {"city": CITY, "population": {"type": "integer", "minimum": 0}},
            additionalProperties=False,
        ),
        "Tell me about Tokyo.",
    ),
    (
        "json_schema",
        obj(
            {
                "colors": {
                    "type": "array",
                    "items": {"enum": ["red", "green", "blue"]},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            additionalProperties=False,
        ),
        "Name primary colors.",
    ),
    (
        "json_schema",
        obj(
            {"ok": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 40}},
            additionalProperties=False,
        ),
        "Is water wet?",
    ),
    (
        "json_schema",
        obj(
            {
                "point": obj(
                    {
                        "x": {"type": "number", "minimum": -10, "maximum": 10},
                        "y": {"type": "number", "minimum": -10, "maximum": 10},
                    },
                    additionalProperties=False,
                )
            },
            additionalProperties=False,
        ),
        "Give a point on a plane.",
    ),
    (
        "json_schema",
        obj(
            {
                "date": {"type": "string", "format": "date"},
                "event": {"type": "string", "maxLength": 40},
            },
            additionalProperties=False,
        ),
        "When did the Apollo 11 landing happen?",
    ),
    (
        "json_schema",
        obj(
            {
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "items": obj(
                        {
                            "name": {"type": "string", "maxLength": 20},
                            "price": {"type": "integer", "minimum": 0, "maximum": 1000},
                        },
                        additionalProperties=False,
                    ),
                }
            },
            additionalProperties=False,
        ),
        "List a shopping basket.",
    ),
    (
        "json_schema",
        obj(
            {
                "answer": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]
                }
            },
            additionalProperties=False,
        ),
        "What is 6 times 7?",
    ),
    (
        "json_schema",
        obj({"id": {"type": "string", "format": "uuid"}}, additionalProperties=False),
        "Make up a UUID.",
    ),
    (
        "json_schema",
        {"type": "object", "properties": {}, "additionalProperties": False},
        "Say nothing.",
    ),
    ("json_schema", {}, "Is Paris in France? Answer in JSON."),
    (
        "json_schema",
        obj(
            {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "maxItems": 4,
                }
            },
            additionalProperties=False,
        ),
        "Tag this photo of a beach.",
    ),
    ("json_object", None, "Give me a JSON object with a name and an age."),
    ("json_object", None, "Return a JSON object with the key answer."),
    ("regex", r"\d{3}-\d{4}", "Invent a phone number:"),
    ("regex", r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "Today's date is"),
    ("regex", r"[A-Z][a-z]{2,10} (is|was) [a-z]{2,12}\.", "Write a short sentence."),
    ("choice", ["yes", "no"], "Is the sky blue?"),
    ("choice", ["Paris", "Rome", "Berlin", "Madrid"], "The capital of Italy is"),
    ("choice", ["positive", "negative", "neutral"], "Sentiment of 'I love it':"),
]
