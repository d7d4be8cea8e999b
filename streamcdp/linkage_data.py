"""A labelled synthetic record-linkage set: people seen several times, messily.

``generate_linkage_set(seed)`` makes households of people and, for each person, a
few records as different systems (CRM, shop sign-up, store till) would hold them,
with the damage such data has:

* typing errors in names (a letter dropped, doubled, swapped or replaced),
  accents lost, case and spacing changed, a given name reduced to its initial;
* given name and surname swapped;
* people who moved (another street, postcode and city on a later record);
* households: members share surname, address and often one family phone number;
  some are twins (same date of birth, different given names);
* common names: unrelated people with the same name, some born the same year;
* missing fields; dates of birth with a typing error or day and month swapped;
  phone numbers written nationally or internationally.

Each record carries the true person (``entity``) for scoring, and its traits in
one of several spellings (Segment's ``firstName``/``lastName``/``address``{...},
a CRM's ``first_name``/``dob``/``postcode``, or a full ``name``), so the benchmark
also exercises :func:`agents.identity.fuzzy.match_record`. Deterministic: the same
seed gives the same records in the same order (a shuffled stream).

>>> records = generate_linkage_set(seed=3, households=20)
>>> records == generate_linkage_set(seed=3, households=20)
True
>>> records[0].record_id, len({r.entity for r in records}) < len(records)
('syn-3-000000', True)
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

import orjson

__all__ = ["LabelledRecord", "generate_linkage_set", "import_rows", "main"]

_GIVEN_F = (
    "Anna", "Ann", "Maria", "Sophie", "Emma", "Olivia", "Chloé", "Zoë", "Grace", "Ines", "Lena", "Mia",
    "Priya", "Rosa", "Sarah", "Laura", "Julia", "Eva", "Hannah", "Lucy", "Charlotte", "Amelia", "Isla",
    "Freya", "Ella", "Fatima", "Aisha", "Mei", "Yuki", "Siobhan", "Małgorzata", "Renée", "Agnès", "Léa",
    "Camille", "Elena", "Ingrid", "Astrid", "Noor", "Leila", "Kate", "Helen", "Claire", "Joanna", "Nadia",
)
_GIVEN_M = (
    "John", "James", "David", "Michael", "Thomas", "Daniel", "Ben", "Sam", "Noah", "Hugo", "Omar", "Tariq",
    "Kai", "Jun", "Femi", "Lucas", "Leo", "Oliver", "Jack", "Harry", "George", "Peter", "Paul", "Mark",
    "Luca", "Matteo", "José", "Jürgen", "Søren", "François", "Mohammed", "Ali", "Arjun", "Ravi", "Chen",
    "Wei", "Liam", "Sean", "Ethan", "Adam", "Felix", "Oscar", "Anton", "Nikolai", "Pedro",
)
_SURNAMES = (
    "Smith", "Jones", "Brown", "Taylor", "Wilson", "Lee", "García", "Müller", "Rossi", "Nguyen", "Okafor",
    "Kim", "Novak", "Silva", "Dubois", "Cohen", "Jensen", "Ivanova", "Khan", "Patel", "O'Brien", "Murphy",
    "Schmidt", "Schneider", "Fischer", "Weber", "Martin", "Bernard", "Moreau", "Lefèvre", "Fernández",
    "López", "Martínez", "Romano", "Ricci", "Kowalski", "Nowak", "Wiśniewski", "Andersson", "Johansson",
    "Hansen", "Nielsen", "Van der Berg", "De Vries", "Jansen", "Walker", "Wright", "Thompson", "White",
    "Harris", "Clarke", "Robinson", "Wood", "Hughes", "Edwards", "Green", "Hall", "Young", "King", "Scott",
    "Sato", "Suzuki", "Tanaka", "Wang", "Li", "Zhang", "Chen", "Singh", "Kumar", "Ahmed", "Hassan",
    "Mbeki", "Mensah", "Adeyemi", "Papadopoulos", "Nagy", "Horvat", "Popescu", "Yilmaz", "Kaya",
)
_STREET_NAMES = (
    "High", "Station", "Church", "Park", "Victoria", "Green", "Manor", "Kings", "Queens", "Mill", "Windsor",
    "Albert", "Elm", "Oak", "Maple", "Cedar", "Pine", "Lake", "Hill", "River", "Bridge", "Castle", "Market",
    "Garden", "Orchard", "Meadow", "Forest", "Spring", "North", "South", "Pinkerton", "Salkauskas",
    "Macquoid", "Randwick", "Stanley", "Lyster", "Edkins", "Lambrigg", "Maxwell", "Sunset", "Harbour",
)
_STREET_TYPES = ("Street", "Road", "Avenue", "Lane", "Drive", "Place", "Crescent", "Court", "Way", "Close")
_STREET_SHORT = {"Street": "St", "Road": "Rd", "Avenue": "Ave", "Lane": "Ln", "Drive": "Dr", "Place": "Pl", "Crescent": "Cres", "Court": "Ct"}
_CITIES = (
    ("Springfield", "62701"), ("Riverton", "84065"), ("Fairview", "37062"), ("Georgetown", "78626"),
    ("Madison", "53703"), ("Franklin", "37064"), ("Clinton", "52732"), ("Arlington", "22201"),
    ("Salem", "97301"), ("Ashland", "97520"), ("Dover", "19901"), ("Milton", "02186"),
    ("Oxford", "38655"), ("Bristol", "06010"), ("Burlington", "05401"), ("Kingston", "12401"),
    ("Newport", "02840"), ("Winchester", "22601"), ("Hudson", "12534"), ("Marion", "43302"),
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class LabelledRecord:
    record_id: str  # unique per record (the ``crm_id`` of the benchmark)
    entity: str  # the true person
    traits: dict


@dataclass(slots=True)
class _Person:
    entity: str
    given: str
    surname: str
    dob: date
    street: str
    city: str
    postcode: str
    mobile: str | None
    home_phone: str | None
    moved_to: tuple[str, str, str] | None


def _typo(rng: random.Random, text: str) -> str:
    """One typing error: a letter dropped, doubled, replaced, or two swapped."""
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    if len(letters) < 3:
        return text
    i = rng.choice(letters[1:])  # people rarely get the first letter wrong
    kind = rng.randrange(4)
    if kind == 0:
        return text[:i] + text[i + 1 :]
    if kind == 1:
        return text[:i] + text[i] + text[i:]
    if kind == 2:
        return text[:i] + rng.choice(_LETTERS) + text[i + 1 :]
    j = i - 1 if i == len(text) - 1 else i
    return text[:j] + text[j + 1] + text[j] + text[j + 2 :]


def _strip_accents(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _phone(rng: random.Random) -> str:
    return f"+1{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"


def _written_phone(rng: random.Random, e164: str) -> str:
    national = e164[2:]
    style = rng.randrange(4)
    if style == 0:
        return e164
    if style == 1:
        return f"({national[:3]}) {national[3:6]}-{national[6:]}"
    if style == 2:
        return f"{national[:3]}.{national[3:6]}.{national[6:]}"
    return f"+1 {national[:3]} {national[3:6]} {national[6:]}"


def _address(rng: random.Random) -> tuple[str, str, str]:
    city, postcode = rng.choice(_CITIES)
    street = f"{rng.randint(1, 250)} {rng.choice(_STREET_NAMES)} {rng.choice(_STREET_TYPES)}"
    return street, city, postcode


def _dob(rng: random.Random, low: int, high: int) -> date:
    return date(low, 1, 1) + timedelta(days=rng.randrange((date(high, 12, 31) - date(low, 1, 1)).days))


def _household(rng: random.Random, index: int, seed: int) -> list[_Person]:
    surname = rng.choice(_SURNAMES)
    street, city, postcode = _address(rng)
    home_phone = _phone(rng) if rng.random() < 0.6 else None
    size = rng.choices((1, 2, 3, 4, 5), weights=(35, 30, 15, 14, 6))[0]
    moved = _address(rng) if rng.random() < 0.25 else None
    people: list[_Person] = []
    adults_born = _dob(rng, 1945, 1995)
    twins_at = rng.randrange(2, size) if size >= 4 and rng.random() < 0.3 else None
    child_dob = _dob(rng, max(adults_born.year + 18, 1970), min(adults_born.year + 45, 2015))
    for k in range(size):
        female = rng.random() < 0.5
        given = rng.choice(_GIVEN_F if female else _GIVEN_M)
        while any(p.given == given for p in people):
            given = rng.choice(_GIVEN_F if female else _GIVEN_M)
        if k == 0:
            born = adults_born
        elif k == 1:
            born = adults_born + timedelta(days=rng.randint(-3000, 3000))
        elif twins_at is not None and k == twins_at + 1:
            born = people[-1].dob  # twins: same date of birth, other given name
        else:
            born = _dob(rng, max(adults_born.year + 18, 1970), min(adults_born.year + 45, 2015)) if k != 2 else child_dob
        own_surname = surname if k == 0 or rng.random() < 0.85 else rng.choice(_SURNAMES)
        people.append(
            _Person(
                entity=f"syn-{seed}-p{index:05d}-{k}",
                given=given,
                surname=own_surname,
                dob=born,
                street=street,
                city=city,
                postcode=postcode,
                mobile=_phone(rng) if rng.random() < 0.7 else None,
                home_phone=home_phone,
                moved_to=moved if rng.random() < 0.8 else None,
            )
        )
    return people


def _record_traits(rng: random.Random, person: _Person, first: bool) -> dict:
    given, surname = person.given, person.surname
    if not first:
        if rng.random() < 0.25:
            given = _typo(rng, given)
        if rng.random() < 0.25:
            surname = _typo(rng, surname)
        if rng.random() < 0.15:
            given, surname = _strip_accents(given), _strip_accents(surname)
        if rng.random() < 0.04:
            given = given[0] + "."
        if rng.random() < 0.06:
            given, surname = surname, given
    if rng.random() < 0.2:
        given, surname = given.upper(), surname.upper()
    street, city, postcode = person.street, person.city, person.postcode
    if not first and person.moved_to is not None and rng.random() < 0.6:
        street, city, postcode = person.moved_to
    if rng.random() < 0.3:
        words = street.split()
        street = " ".join(words[:-1] + [_STREET_SHORT.get(words[-1], words[-1])])
    if not first and rng.random() < 0.05:
        street = _typo(rng, street)
    if not first and rng.random() < 0.04:
        postcode = postcode[:-2] + postcode[-1] + postcode[-2]
    born = person.dob
    dob_text = born.isoformat()
    if not first and rng.random() < 0.04:
        digits = list(dob_text.replace("-", ""))
        i = rng.choice((5, 7))  # a wrong last digit of month or day, when still a date
        digits[i] = str(rng.randrange(10))
        candidate = "".join(digits)
        try:
            date(int(candidate[:4]), int(candidate[4:6]), int(candidate[6:]))
            dob_text = f"{candidate[:4]}-{candidate[4:6]}-{candidate[6:]}"
        except ValueError:
            pass
    phones = [p for p in (person.mobile, person.home_phone) if p]
    phone = rng.choice(phones) if phones else None

    has_dob = rng.random() < 0.8
    has_address = rng.random() < 0.7
    has_phone = phone is not None and rng.random() < 0.7
    if not (has_dob or has_address or has_phone):
        has_dob = True
    style = rng.randrange(3)
    traits: dict = {}
    if style == 0:  # Segment reserved traits
        traits["firstName"] = given
        traits["lastName"] = surname
        if has_dob:
            traits["birthday"] = dob_text
        if has_address:
            traits["address"] = {"street": street, "city": city, "postalCode": postcode, "country": "US"}
    elif style == 1:  # a CRM export
        traits["first_name"] = given
        traits["surname"] = surname
        if has_dob:
            traits["dob"] = dob_text.replace("-", "")
        if has_address:
            number, _, rest = street.partition(" ")
            traits["street_number"] = number
            traits["address_1"] = rest
            traits["suburb"] = city
            traits["postcode"] = postcode
    else:  # a shop sign-up with one name field
        traits["name"] = f"{given} {surname}"
        if has_dob:
            traits["date_of_birth"] = dob_text
        if has_address:
            traits["street_address"] = street
            traits["city"] = city
            traits["zip"] = postcode
    if has_phone:
        traits["phone"] = _written_phone(rng, phone)
    return traits


def generate_linkage_set(seed: int = 0, households: int = 2000) -> list[LabelledRecord]:
    """Records of ``households`` households in a shuffled stream order (see module doc)."""
    rng = random.Random(seed)
    people: list[_Person] = []
    for index in range(households):
        people.extend(_household(rng, index, seed))
    drafts: list[tuple[str, dict]] = []
    for person in people:
        count = rng.choices((1, 2, 3, 4), weights=(30, 40, 20, 10))[0]
        for k in range(count):
            drafts.append((person.entity, _record_traits(rng, person, first=k == 0)))
    rng.shuffle(drafts)
    return [LabelledRecord(f"syn-{seed}-{i:06d}", entity, traits) for i, (entity, traits) in enumerate(drafts)]


def import_rows(records: Iterable[LabelledRecord]) -> Iterable[dict]:
    """The records as rows for ``streamcdp import`` (JSONL): ``external_id.crm_id`` and traits."""
    for record in records:
        yield {"external_id.crm_id": record.record_id, **record.traits}


def main(argv: list[str] | None = None) -> int:
    """``python -m streamcdp.linkage_data --seed 0 rows.jsonl truth.csv``: write the set
    as an import file and its truth (crm_id, entity) for a demo."""
    parser = argparse.ArgumentParser(prog="python -m streamcdp.linkage_data", description=main.__doc__)
    parser.add_argument("rows", help="JSONL file to write, for `streamcdp import FILE --channel crm`")
    parser.add_argument("truth", help="CSV file to write: crm_id,entity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--households", type=int, default=2000)
    args = parser.parse_args(argv)
    return write_linkage_files(args.rows, args.truth, args.seed, args.households)


def write_linkage_files(rows_path: str, truth_path: str, seed: int = 0, households: int = 2000) -> int:
    """Write the labelled set as an import file and its truth; print a summary."""
    records = generate_linkage_set(seed, households)
    with open(rows_path, "wb") as rows:
        for row in import_rows(records):
            rows.write(orjson.dumps(row) + b"\n")
    with open(truth_path, "w") as truth:
        truth.write("crm_id,entity\n")
        for record in records:
            truth.write(f"{record.record_id},{record.entity}\n")
    print(orjson.dumps({"records": len(records), "people": len({r.entity for r in records})}).decode())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
