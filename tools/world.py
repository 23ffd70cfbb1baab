"""The seeded synthetic world behind the mocked APIs: cities, countries, currencies, people, films, companies.

Names are made of syllables so they are new words to any model: an agent must copy them from the query or an
earlier observation, it cannot recall them. Everything is a pure function of the seed: no clock, no network.

WORLD is the small world of the "tiny" suite. The "large" suite (tools.tasks.LargeSuite) builds one World per split
with a shared `used` set, so no name, currency code or ticker occurs in two of them, and the APIs answer from their
union (World.union).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

WORLD_SEED = 20241009

_SYLLABLES = ["ka", "lo", "ri", "ve", "na", "to", "mi", "sa", "du", "ber", "vik", "tor", "lan", "mer", "zo", "qui",
              "pel", "dra", "fen", "gor", "hal", "ist", "jun", "kel", "mor", "nis", "ost", "pra", "rud", "sel"]
FIRST_NAMES = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Katya",
               "Lars", "Mina", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tara", "Viktor"]
CONDITIONS = ["sunny", "cloudy", "rain", "snow", "fog", "windy"]
CONTINENTS = ["Europe", "Asia", "Africa", "Oceania", "America"]
PROFESSIONS = ["director", "writer", "actor", "composer", "painter"]
FILM_ENDINGS = ["Road", "Night", "Sea", "Song"]            # "Kalo Road": the second word of half the film titles
COMPANY_ENDINGS = ["Corp", "Labs", "Group"]                 # "Kalo Corp"


@dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int
    utc_offset: int
    temp_c: float
    condition: str
    humidity: int


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    currency: str
    population: int
    continent: str


@dataclass(frozen=True)
class Person:
    name: str
    born_city: str
    birth_year: int
    profession: str


@dataclass(frozen=True)
class Film:
    title: str
    director: str
    year: int
    rating: float


@dataclass(frozen=True)
class Company:
    name: str
    ticker: str
    hq_city: str
    ceo: str
    price_usd: float


class World:
    """Every entity, keyed by name. `used`: names, currency codes and tickers taken by other worlds (updated here);
    share one set between worlds to keep them disjoint."""

    def __init__(self, seed: int = WORLD_SEED, n_countries: int = 8, cities_per_country: int = 3, n_people: int = 16,
                 n_films: int = 16, n_companies: int = 12, used: set | None = None):
        rng = random.Random(seed)
        used = set() if used is None else used

        def word(parts: int) -> str:
            while True:
                w = "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()
                if w not in used:
                    used.add(w)
                    return w

        self.currencies: dict[str, float] = {"USD": 1.0}       # units of the currency per 1 USD
        self.countries: dict[str, Country] = {}
        self.cities: dict[str, City] = {}
        for _ in range(n_countries):
            country = word(3)
            code = (country[:2] + rng.choice("XYZQJ")).upper()
            while code in used or code == "USD":   # names are capitalised words, so only codes can clash here
                code = code[:2] + rng.choice("ABCDEFGHKLMNPRSTUVW")
            used.add(code)
            self.currencies[code] = round(rng.uniform(0.2, 9.0), 2)
            names = [word(2) for _ in range(cities_per_country)]
            for name in names:
                self.cities[name] = City(name, country, rng.randrange(20_000, 900_000, 10), rng.randint(-8, 9),
                                         round(rng.uniform(-5, 35), 1), rng.choice(CONDITIONS), rng.randint(20, 95))
            self.countries[country] = Country(country, names[0], code, rng.randrange(1_000_000, 60_000_000, 1000),
                                              rng.choice(CONTINENTS))
        city_names = sorted(self.cities)
        self.people: dict[str, Person] = {}
        for _ in range(n_people):
            name = f"{rng.choice(FIRST_NAMES)} {word(2)}"
            self.people[name] = Person(name, rng.choice(city_names), rng.randint(1940, 1995), rng.choice(PROFESSIONS))
        person_names = sorted(self.people)
        self.films: dict[str, Film] = {}
        for _ in range(n_films):
            title = f"The {word(2)}" if rng.random() < 0.5 else f"{word(2)} {rng.choice(FILM_ENDINGS)}"
            self.films[title] = Film(title, rng.choice(person_names), rng.randint(1970, 2023), round(rng.uniform(4, 9.5), 1))
        self.companies: dict[str, Company] = {}
        for _ in range(n_companies):
            name = f"{word(2)} {rng.choice(COMPANY_ENDINGS)}"
            ticker = name[:3].upper() + rng.choice("XYZ")
            while ticker in used:
                ticker = ticker[:3] + rng.choice("ABCDEFGHJK")
            used.add(ticker)
            self.companies[name] = Company(name, ticker, rng.choice(city_names), rng.choice(person_names),
                                           round(rng.uniform(5, 400), 2))
        self.tickers = {c.ticker: c for c in self.companies.values()}

    @classmethod
    def union(cls, worlds: list) -> "World":
        """One world holding the entities of several disjoint worlds (they share only USD)."""
        merged = cls.__new__(cls)
        for table in ("currencies", "countries", "cities", "people", "films", "companies", "tickers"):
            tables = [getattr(w, table) for w in worlds]
            union = {k: v for t in tables for k, v in t.items()}
            if len(union) != sum(map(len, tables)) - (len(worlds) - 1) * (table == "currencies"):
                raise ValueError(f"the worlds share {table}: build them with one `used` set")
            setattr(merged, table, union)
        return merged


WORLD = World()
