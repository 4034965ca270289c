"""Class names of the registered benchmarks, stored as data (index = the source's label id).

Names are human-readable (underscores replaced by spaces) because the zero-shot CLIP head
builds text prompts from them. ImageNet-R's labels are ImageNet-1k WordNet ids; the 200 it
uses are listed with a readable name each, sorted by id (the order of the folder source and
of the label ids this library assigns).
"""


def _names(block: str) -> tuple[str, ...]:
    """Splits a block of ``' | '``-separated names, several per line, into a tuple."""
    return tuple(name.strip() for line in block.strip().splitlines() for name in line.split(" | "))


def _pairs(block: str) -> tuple[tuple[str, str], ...]:
    """Splits ``'wnid name | wnid name'`` into ``((wnid, name), ...)``."""
    return tuple(tuple(item.split(" ", 1)) for item in _names(block))  # type: ignore[misc]


# Fashion-MNIST (Zalando), label ids 0-9.
FASHION_MNIST = _names("""
T-shirt/top | Trouser | Pullover | Dress | Coat | Sandal | Shirt | Sneaker | Bag
Ankle boot
""")

# MNIST digits.
MNIST = tuple(str(d) for d in range(10))

# CIFAR-100 fine labels, label ids 0-99 (alphabetical, as in the dataset).
CIFAR100 = _names("""
apple | aquarium fish | baby | bear | beaver | bed | bee | beetle | bicycle | bottle | bowl
boy | bridge | bus | butterfly | camel | can | castle | caterpillar | cattle | chair
chimpanzee | clock | cloud | cockroach | couch | crab | crocodile | cup | dinosaur | dolphin
elephant | flatfish | forest | fox | girl | hamster | house | kangaroo | keyboard | lamp
lawn mower | leopard | lion | lizard | lobster | man | maple tree | motorcycle | mountain
mouse | mushroom | oak tree | orange | orchid | otter | palm tree | pear | pickup truck
pine tree | plain | plate | poppy | porcupine | possum | rabbit | raccoon | ray | road
rocket | rose | sea | seal | shark | shrew | skunk | skyscraper | snail | snake | spider
squirrel | streetcar | sunflower | sweet pepper | table | tank | telephone | television
tiger | tractor | train | trout | tulip | turtle | wardrobe | whale | willow tree | wolf
woman | worm
""")

# Stanford Cars, label ids 0-195 (the order of TFDS `cars196`).
CARS196 = _names("""
AM General Hummer SUV 2000 | Acura RL Sedan 2012 | Acura TL Sedan 2012
Acura TL Type-S 2008 | Acura TSX Sedan 2012 | Acura Integra Type R 2001
Acura ZDX Hatchback 2012 | Aston Martin V8 Vantage Convertible 2012
Aston Martin V8 Vantage Coupe 2012 | Aston Martin Virage Convertible 2012
Aston Martin Virage Coupe 2012 | Audi RS 4 Convertible 2008 | Audi A5 Coupe 2012
Audi TTS Coupe 2012 | Audi R8 Coupe 2012 | Audi V8 Sedan 1994 | Audi 100 Sedan 1994
Audi 100 Wagon 1994 | Audi TT Hatchback 2011 | Audi S6 Sedan 2011 | Audi S5 Convertible 2012
Audi S5 Coupe 2012 | Audi S4 Sedan 2012 | Audi S4 Sedan 2007 | Audi TT RS Coupe 2012
BMW ActiveHybrid 5 Sedan 2012 | BMW 1 Series Convertible 2012 | BMW 1 Series Coupe 2012
BMW 3 Series Sedan 2012 | BMW 3 Series Wagon 2012 | BMW 6 Series Convertible 2007
BMW X5 SUV 2007 | BMW X6 SUV 2012 | BMW M3 Coupe 2012 | BMW M5 Sedan 2010
BMW M6 Convertible 2010 | BMW X3 SUV 2012 | BMW Z4 Convertible 2012
Bentley Continental Supersports Conv. Convertible 2012 | Bentley Arnage Sedan 2009
Bentley Mulsanne Sedan 2011 | Bentley Continental GT Coupe 2012
Bentley Continental GT Coupe 2007 | Bentley Continental Flying Spur Sedan 2007
Bugatti Veyron 16.4 Convertible 2009 | Bugatti Veyron 16.4 Coupe 2009 | Buick Regal GS 2012
Buick Rainier SUV 2007 | Buick Verano Sedan 2012 | Buick Enclave SUV 2012
Cadillac CTS-V Sedan 2012 | Cadillac SRX SUV 2012 | Cadillac Escalade EXT Crew Cab 2007
Chevrolet Silverado 1500 Hybrid Crew Cab 2012 | Chevrolet Corvette Convertible 2012
Chevrolet Corvette ZR1 2012 | Chevrolet Corvette Ron Fellows Edition Z06 2007
Chevrolet Traverse SUV 2012 | Chevrolet Camaro Convertible 2012 | Chevrolet HHR SS 2010
Chevrolet Impala Sedan 2007 | Chevrolet Tahoe Hybrid SUV 2012 | Chevrolet Sonic Sedan 2012
Chevrolet Express Cargo Van 2007 | Chevrolet Avalanche Crew Cab 2012
Chevrolet Cobalt SS 2010 | Chevrolet Malibu Hybrid Sedan 2010
Chevrolet TrailBlazer SS 2009 | Chevrolet Silverado 2500HD Regular Cab 2012
Chevrolet Silverado 1500 Classic Extended Cab 2007 | Chevrolet Express Van 2007
Chevrolet Monte Carlo Coupe 2007 | Chevrolet Malibu Sedan 2007
Chevrolet Silverado 1500 Extended Cab 2012 | Chevrolet Silverado 1500 Regular Cab 2012
Chrysler Aspen SUV 2009 | Chrysler Sebring Convertible 2010
Chrysler Town and Country Minivan 2012 | Chrysler 300 SRT-8 2010
Chrysler Crossfire Convertible 2008 | Chrysler PT Cruiser Convertible 2008
Daewoo Nubira Wagon 2002 | Dodge Caliber Wagon 2012 | Dodge Caliber Wagon 2007
Dodge Caravan Minivan 1997 | Dodge Ram Pickup 3500 Crew Cab 2010
Dodge Ram Pickup 3500 Quad Cab 2009 | Dodge Sprinter Cargo Van 2009 | Dodge Journey SUV 2012
Dodge Dakota Crew Cab 2010 | Dodge Dakota Club Cab 2007 | Dodge Magnum Wagon 2008
Dodge Challenger SRT8 2011 | Dodge Durango SUV 2012 | Dodge Durango SUV 2007
Dodge Charger Sedan 2012 | Dodge Charger SRT-8 2009 | Eagle Talon Hatchback 1998
FIAT 500 Abarth 2012 | FIAT 500 Convertible 2012 | Ferrari FF Coupe 2012
Ferrari California Convertible 2012 | Ferrari 458 Italia Convertible 2012
Ferrari 458 Italia Coupe 2012 | Fisker Karma Sedan 2012
Ford F-450 Super Duty Crew Cab 2012 | Ford Mustang Convertible 2007
Ford Freestar Minivan 2007 | Ford Expedition EL SUV 2009 | Ford Edge SUV 2012
Ford Ranger SuperCab 2011 | Ford GT Coupe 2006 | Ford F-150 Regular Cab 2012
Ford F-150 Regular Cab 2007 | Ford Focus Sedan 2007 | Ford E-Series Wagon Van 2012
Ford Fiesta Sedan 2012 | GMC Terrain SUV 2012 | GMC Savana Van 2012
GMC Yukon Hybrid SUV 2012 | GMC Acadia SUV 2012 | GMC Canyon Extended Cab 2012
Geo Metro Convertible 1993 | HUMMER H3T Crew Cab 2010 | HUMMER H2 SUT Crew Cab 2009
Honda Odyssey Minivan 2012 | Honda Odyssey Minivan 2007 | Honda Accord Coupe 2012
Honda Accord Sedan 2012 | Hyundai Veloster Hatchback 2012 | Hyundai Santa Fe SUV 2012
Hyundai Tucson SUV 2012 | Hyundai Veracruz SUV 2012 | Hyundai Sonata Hybrid Sedan 2012
Hyundai Elantra Sedan 2007 | Hyundai Accent Sedan 2012 | Hyundai Genesis Sedan 2012
Hyundai Sonata Sedan 2012 | Hyundai Elantra Touring Hatchback 2012
Hyundai Azera Sedan 2012 | Infiniti G Coupe IPL 2012 | Infiniti QX56 SUV 2011
Isuzu Ascender SUV 2008 | Jaguar XK XKR 2012 | Jeep Patriot SUV 2012
Jeep Wrangler SUV 2012 | Jeep Liberty SUV 2012 | Jeep Grand Cherokee SUV 2012
Jeep Compass SUV 2012 | Lamborghini Reventon Coupe 2008 | Lamborghini Aventador Coupe 2012
Lamborghini Gallardo LP 570-4 Superleggera 2012 | Lamborghini Diablo Coupe 2001
Land Rover Range Rover SUV 2012 | Land Rover LR2 SUV 2012 | Lincoln Town Car Sedan 2011
MINI Cooper Roadster Convertible 2012 | Maybach Landaulet Convertible 2012
Mazda Tribute SUV 2011 | McLaren MP4-12C Coupe 2012
Mercedes-Benz 300-Class Convertible 1993 | Mercedes-Benz C-Class Sedan 2012
Mercedes-Benz SL-Class Coupe 2009 | Mercedes-Benz E-Class Sedan 2012
Mercedes-Benz S-Class Sedan 2012 | Mercedes-Benz Sprinter Van 2012
Mitsubishi Lancer Sedan 2012 | Nissan Leaf Hatchback 2012 | Nissan NV Passenger Van 2012
Nissan Juke Hatchback 2012 | Nissan 240SX Coupe 1998 | Plymouth Neon Coupe 1999
Porsche Panamera Sedan 2012 | Ram C/V Cargo Van Minivan 2012
Rolls-Royce Phantom Drophead Coupe Convertible 2012 | Rolls-Royce Ghost Sedan 2012
Rolls-Royce Phantom Sedan 2012 | Scion xD Hatchback 2012 | Spyker C8 Convertible 2009
Spyker C8 Coupe 2009 | Suzuki Aerio Sedan 2007 | Suzuki Kizashi Sedan 2012
Suzuki SX4 Hatchback 2012 | Suzuki SX4 Sedan 2012 | Tesla Model S Sedan 2012
Toyota Sequoia SUV 2012 | Toyota Camry Sedan 2012 | Toyota Corolla Sedan 2012
Toyota 4Runner SUV 2012 | Volkswagen Golf Hatchback 2012 | Volkswagen Golf Hatchback 1991
Volkswagen Beetle Hatchback 2012 | Volvo C30 Hatchback 2012 | Volvo 240 Sedan 1993
Volvo XC90 SUV 2007 | smart fortwo Convertible 2012
""")

# Caltech-UCSD Birds-200-2011, label ids 0-199 (class folder number minus one).
CUB200 = _names("""
Black footed Albatross | Laysan Albatross | Sooty Albatross | Groove billed Ani
Crested Auklet | Least Auklet | Parakeet Auklet | Rhinoceros Auklet | Brewer Blackbird
Red winged Blackbird | Rusty Blackbird | Yellow headed Blackbird | Bobolink | Indigo Bunting
Lazuli Bunting | Painted Bunting | Cardinal | Spotted Catbird | Gray Catbird
Yellow breasted Chat | Eastern Towhee | Chuck will Widow | Brandt Cormorant
Red faced Cormorant | Pelagic Cormorant | Bronzed Cowbird | Shiny Cowbird | Brown Creeper
American Crow | Fish Crow | Black billed Cuckoo | Mangrove Cuckoo | Yellow billed Cuckoo
Gray crowned Rosy Finch | Purple Finch | Northern Flicker | Acadian Flycatcher
Great Crested Flycatcher | Least Flycatcher | Olive sided Flycatcher
Scissor tailed Flycatcher | Vermilion Flycatcher | Yellow bellied Flycatcher | Frigatebird
Northern Fulmar | Gadwall | American Goldfinch | European Goldfinch | Boat tailed Grackle
Eared Grebe | Horned Grebe | Pied billed Grebe | Western Grebe | Blue Grosbeak
Evening Grosbeak | Pine Grosbeak | Rose breasted Grosbeak | Pigeon Guillemot
California Gull | Glaucous winged Gull | Heermann Gull | Herring Gull | Ivory Gull
Ring billed Gull | Slaty backed Gull | Western Gull | Anna Hummingbird
Ruby throated Hummingbird | Rufous Hummingbird | Green Violetear | Long tailed Jaeger
Pomarine Jaeger | Blue Jay | Florida Jay | Green Jay | Dark eyed Junco | Tropical Kingbird
Gray Kingbird | Belted Kingfisher | Green Kingfisher | Pied Kingfisher | Ringed Kingfisher
White breasted Kingfisher | Red legged Kittiwake | Horned Lark | Pacific Loon | Mallard
Western Meadowlark | Hooded Merganser | Red breasted Merganser | Mockingbird | Nighthawk
Clark Nutcracker | White breasted Nuthatch | Baltimore Oriole | Hooded Oriole
Orchard Oriole | Scott Oriole | Ovenbird | Brown Pelican | White Pelican
Western Wood Pewee | Sayornis | American Pipit | Whip poor Will | Horned Puffin
Common Raven | White necked Raven | American Redstart | Geococcyx | Loggerhead Shrike
Great Grey Shrike | Baird Sparrow | Black throated Sparrow | Brewer Sparrow
Chipping Sparrow | Clay colored Sparrow | House Sparrow | Field Sparrow | Fox Sparrow
Grasshopper Sparrow | Harris Sparrow | Henslow Sparrow | Le Conte Sparrow | Lincoln Sparrow
Nelson Sharp tailed Sparrow | Savannah Sparrow | Seaside Sparrow | Song Sparrow
Tree Sparrow | Vesper Sparrow | White crowned Sparrow | White throated Sparrow
Cape Glossy Starling | Bank Swallow | Barn Swallow | Cliff Swallow | Tree Swallow
Scarlet Tanager | Summer Tanager | Artic Tern | Black Tern | Caspian Tern | Common Tern
Elegant Tern | Forsters Tern | Least Tern | Green tailed Towhee | Brown Thrasher
Sage Thrasher | Black capped Vireo | Blue headed Vireo | Philadelphia Vireo | Red eyed Vireo
Warbling Vireo | White eyed Vireo | Yellow throated Vireo | Bay breasted Warbler
Black and white Warbler | Black throated Blue Warbler | Blue winged Warbler | Canada Warbler
Cape May Warbler | Cerulean Warbler | Chestnut sided Warbler | Golden winged Warbler
Hooded Warbler | Kentucky Warbler | Magnolia Warbler | Mourning Warbler | Myrtle Warbler
Nashville Warbler | Orange crowned Warbler | Palm Warbler | Pine Warbler | Prairie Warbler
Prothonotary Warbler | Swainson Warbler | Tennessee Warbler | Wilson Warbler
Worm eating Warbler | Yellow Warbler | Northern Waterthrush | Louisiana Waterthrush
Bohemian Waxwing | Cedar Waxwing | American Three toed Woodpecker | Pileated Woodpecker
Red bellied Woodpecker | Red cockaded Woodpecker | Red headed Woodpecker | Downy Woodpecker
Bewick Wren | Cactus Wren | Carolina Wren | House Wren | Marsh Wren | Rock Wren
Winter Wren | Common Yellowthroat
""")

# ImageNet-R: (WordNet id, readable name), sorted by id.
_IMAGENET_R = _pairs("""
n01443537 goldfish | n01484850 great white shark | n01494475 hammerhead | n01498041 stingray
n01514859 hen | n01518878 ostrich | n01531178 goldfinch | n01534433 junco
n01614925 bald eagle | n01616318 vulture | n01630670 newt | n01632777 axolotl
n01644373 tree frog | n01677366 iguana | n01694178 African chameleon | n01748264 cobra
n01770393 scorpion | n01774750 tarantula | n01784675 centipede | n01806143 peacock
n01820546 lorikeet | n01833805 hummingbird | n01843383 toucan | n01847000 duck
n01855672 goose | n01860187 black swan | n01882714 koala | n01910747 jellyfish
n01944390 snail | n01983481 lobster | n01986214 hermit crab | n02007558 flamingo
n02009912 american egret | n02051845 pelican | n02056570 king penguin | n02066245 grey whale
n02071294 killer whale | n02077923 sea lion | n02085620 chihuahua | n02086240 shih tzu
n02088094 afghan hound | n02088238 basset hound | n02088364 beagle | n02088466 bloodhound
n02091032 italian greyhound | n02091134 whippet | n02092339 weimaraner
n02094433 yorkshire terrier | n02096585 boston terrier | n02097298 scottish terrier
n02098286 west highland white terrier | n02099601 golden retriever
n02099712 labrador retriever | n02102318 cocker spaniels | n02106030 collie
n02106166 border collie | n02106550 rottweiler | n02106662 german shepherd dog
n02108089 boxer | n02108915 french bulldog | n02109525 saint bernard | n02110185 husky
n02110341 dalmatian | n02110958 pug | n02112018 pomeranian | n02112137 chow chow
n02113023 pembroke welsh corgi | n02113624 toy poodle | n02113799 standard poodle
n02114367 timber wolf | n02117135 hyena | n02119022 red fox | n02123045 tabby cat
n02128385 leopard | n02128757 snow leopard | n02129165 lion | n02129604 tiger
n02130308 cheetah | n02134084 polar bear | n02138441 meerkat | n02165456 ladybug
n02190166 fly | n02206856 bee | n02219486 ant | n02226429 grasshopper | n02233338 cockroach
n02236044 mantis | n02268443 dragonfly | n02279972 monarch butterfly | n02317335 starfish
n02325366 wood rabbit | n02346627 porcupine | n02356798 fox squirrel | n02363005 beaver
n02364673 guinea pig | n02391049 zebra | n02395406 pig | n02398521 hippopotamus
n02410509 bison | n02423022 gazelle | n02437616 llama | n02445715 skunk | n02447366 badger
n02480495 orangutan | n02480855 gorilla | n02481823 chimpanzee | n02483362 gibbon
n02486410 baboon | n02510455 panda | n02526121 eel | n02607072 clown fish
n02655020 puffer fish | n02672831 accordion | n02701002 ambulance | n02749479 assault rifle
n02769748 backpack | n02793495 barn | n02797295 wheelbarrow | n02802426 basketball
n02808440 bathtub | n02814860 lighthouse | n02823750 beer glass | n02841315 binoculars
n02843684 birdhouse | n02883205 bow tie | n02906734 broom | n02909870 bucket
n02939185 cauldron | n02948072 candle | n02950826 cannon | n02951358 canoe
n02966193 carousel | n02980441 castle | n02992529 mobile phone | n03124170 cowboy hat
n03272010 electric guitar | n03345487 fire engine | n03372029 flute | n03424325 gasmask
n03452741 grand piano | n03467068 guillotine | n03481172 hammer | n03494278 harmonica
n03495258 harp | n03498962 hatchet | n03594945 jeep | n03602883 joystick
n03630383 lab coat | n03649909 lawn mower | n03676483 lipstick | n03710193 mailbox
n03773504 missile | n03775071 mitten | n03888257 parachute | n03930630 pickup truck
n03947888 pirate ship | n04086273 revolver | n04118538 rugby ball | n04133789 sandal
n04141076 saxophone | n04146614 school bus | n04147183 schooner | n04192698 shield
n04254680 soccer ball | n04266014 space shuttle | n04275548 spider web
n04310018 steam locomotive | n04325704 scarf | n04347754 submarine | n04389033 tank
n04409515 tennis ball | n04465501 tractor | n04487394 trombone | n04522168 vase
n04536866 violin | n04552348 military aircraft | n04591713 wine bottle | n07614500 ice cream
n07693725 bagel | n07695742 pretzel | n07697313 cheeseburger | n07697537 hotdog
n07714571 cabbage | n07714990 broccoli | n07718472 cucumber | n07720875 bell pepper
n07734744 mushroom | n07742313 Granny Smith | n07745940 strawberry | n07749582 lemon
n07753275 pineapple | n07753592 banana | n07768694 pomegranate | n07873807 pizza
n07880968 burrito | n07920052 espresso | n09472597 volcano | n09835506 baseball player
n10565667 scuba diver | n12267677 acorn
""")
IMAGENET_R_WNIDS = tuple(wnid for wnid, _ in _IMAGENET_R)
IMAGENET_R = tuple(name for _, name in _IMAGENET_R)
